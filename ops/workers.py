"""uvicorn as ``serve`` runs it; with several workers, a listening socket for each.

uvicorn's own supervisor (``uvicorn.run(workers=N)``) shares one listening socket between
its workers, and a new connection goes to whichever worker accepts first. A caller that
opens its keep-alive pool at once (wrk's 64 connections in ``make bench``; an API
gateway's pool) can land most of it on one worker: wrk's 64 split 41/23, 57/7, 19/45,
44/20, 41/23 and 60/4 over six starts (``ss -tnp``), and the worker holding 60 queues
while the other idles. On Linux, ``serve --workers N`` therefore starts N processes
(``quota-gateway serve-worker``), each with a socket of its own bound to the same address
with ``SO_REUSEPORT``, and the kernel picks a listener for each new connection by a hash
of its addresses (40/24, 32/32, 28/36 and 44/20 over four starts). Each worker is kept
running (``Supervised``: restarted if it exits, and dies with this process); SIGTERM or
SIGINT stops them all at once, each draining its requests as uvicorn does. Elsewhere
uvicorn's supervisor serves as before.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from types import FrameType
from typing import Any

from ops.lifecycle import Supervised, stop_all

log = logging.getLogger("quota_gateway")

#: How long a worker has to drain its requests on a stop (uvicorn's graceful shutdown).
GRACEFUL_SECONDS = 10
#: After a stop, how long each worker has to exit before it is killed.
STOP_SECONDS = 15.0


def uvicorn_options(host: str, port: int, workers: int = 1) -> dict[str, Any]:
    """The one set of uvicorn options of every served process (the service's workers and
    the benchmark's baselines)."""
    from hotpath.http import EnvelopeHttpToolsProtocol

    # proxy_headers off: the payment webhook reads X-Forwarded-For itself, believing only
    # TRUSTED_PROXIES (payments/verifiers.py); uvicorn's own rewriting (which believes
    # 127.0.0.1 by default) would apply a second rule, and costs every request a middleware.
    return {"factory": True, "host": host, "port": port, "workers": workers,
            "loop": "uvloop", "http": EnvelopeHttpToolsProtocol, "access_log": False,
            "log_level": "warning", "timeout_graceful_shutdown": GRACEFUL_SECONDS,
            "proxy_headers": False, "server_header": False}


def spreads_connections() -> bool:
    """Whether the kernel balances connections across SO_REUSEPORT listeners (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (listening starts when uvicorn
    serves on it): one of the listeners the kernel spreads connections across."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def run_uvicorn(factory: str, host: str, port: int, workers: int) -> None:
    """Serve ``factory`` (a uvicorn factory's import path) with ``workers`` processes."""
    if workers > 1 and spreads_connections():
        serve_workers(factory, host, port, workers)
        return
    import uvicorn

    uvicorn.run(factory, **uvicorn_options(host, port, workers))


def serve_worker(factory: str, host: str, port: int) -> None:
    """One worker of ``serve_workers``: its own listener on the shared address. Exits 3
    (uvicorn's status for it) when the app did not start."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(factory, **uvicorn_options(host, port)))
    server.run(sockets=[reuseport_socket(host, port)])
    if not server.started:
        sys.exit(3)


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve_workers(factory: str, host: str, port: int, workers: int) -> None:
    """``workers`` worker processes on ``host:port``, until SIGTERM or SIGINT; then every
    worker is stopped at once (each drains, then exits; killed after ``STOP_SECONDS``).

    The address is bound here first (SO_REUSEPORT, never listening: it gets no
    connections), so that a port in use fails at once and port 0 names one port for all."""
    try:
        reserved = reuseport_socket(host, port)
    except OSError as exc:  # in use, or not an address of this host: as uvicorn says it
        log.error("error while attempting to bind on address (%r, %d): %s", host, port,
                  exc.strerror or exc)
        sys.exit(1)
    port = reserved.getsockname()[1]
    children = [Supervised([sys.executable, "-m", "ops.cli", "serve-worker", "--factory",
                            factory, "--host", host, "--port", str(port)], f"worker {i + 1}")
                for i in range(workers)]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit)
    try:
        for child in children:
            child.start()
        while True:
            signal.pause()
    finally:
        stop_all(children, STOP_SECONDS)
        reserved.close()
