"""The client library's transports, measured against the real service (issue #21).

    .venv/bin/python -m bench.client [--async-calls N] [--sync-calls N] [--workers W]

Starts ``quota-gateway serve --with-reconciler`` on a free port with the machine's Redis and
PostgreSQL (REDIS_URL, DB_DSN; default 127.0.0.1:6379/0 and postgres@127.0.0.1:5432), under
a key prefix of its own and in a database of its own (created, migrated, dropped after),
puts a plan with huge allowances on ``--users`` users, then runs debits:

* async, ``--concurrency`` (32) calls in flight in one process: the bare transport (aiohttp,
  httpx) and the client on it (``AsyncClient`` with the aiohttp or an httpx transport;
  httpx, far slower at that concurrency, makes ``--httpx-calls``);
* sync, one call after another: the bare transport (urllib3, httpx, requests) and
  ``Client`` on each;
* the client alone, on a transport that answers a canned body without I/O: what the
  library itself costs per call (build and encode the body, decode the result);

and reports, for each, calls/s and this process's CPU per call (``time.process_time``,
all threads; the service runs in other processes). "bare" sends a prebuilt body with a
fresh ref and reads the answer's bytes; the client's figure minus the bare one is what the
library adds. Each variant is run ``--rounds`` times, interleaved, and its best round is
its figure (the machine's speed drifts). Writes the figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx
import requests
import urllib3
from quota_gateway_client import AsyncClient, Client, TransportFailure
from quota_gateway_client.transports import Answer

ROOT = Path(__file__).resolve().parent.parent
QG = str(Path(sys.executable).with_name("quota-gateway"))
KEY = os.environ.get("SERVICE_TOKEN", "super-secret-dev")
DEBIT = "/internal/billing/quota/debit"
PLAN = {"meters": {"chat": {"limit": 1_000_000_000, "period": "month"}},
        "duration_days": 30, "price": "0", "currency": "RUB"}
HEADERS = {"X-Internal-Key": KEY, "Content-Type": "application/json",
           "Accept": "application/json"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the candidates' transports for the client (the library ships aiohttp and urllib3) ------
class HttpxAsyncTransport:
    """``AsyncClient`` over httpx.AsyncClient."""

    def __init__(self, base_url: str, *, headers: Any, timeout: float, connect_timeout: float,
                 max_connections: int, keepalive_s: float) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url, headers=dict(headers),
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections,
                                keepalive_expiry=keepalive_s))

    async def request(self, method: str, path: str, body: bytes | None) -> Answer:
        try:
            r = await self._client.request(method, path, content=body)
        except httpx.TransportError as exc:
            raise TransportFailure(str(exc)) from exc
        return r.status_code, r.content, r.headers.get("retry-after")

    async def aclose(self) -> None:
        await self._client.aclose()


class HttpxSyncTransport:
    """``Client`` over httpx.Client."""

    def __init__(self, base_url: str, *, headers: Any, timeout: float, connect_timeout: float,
                 max_connections: int, keepalive_s: float) -> None:
        self._client = httpx.Client(
            base_url=base_url, headers=dict(headers),
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections,
                                keepalive_expiry=keepalive_s))

    def request(self, method: str, path: str, body: bytes | None) -> Answer:
        try:
            r = self._client.request(method, path, content=body)
        except httpx.TransportError as exc:
            raise TransportFailure(str(exc)) from exc
        return r.status_code, r.content, r.headers.get("retry-after")

    def close(self) -> None:
        self._client.close()


class RequestsTransport:
    """``Client`` over a requests.Session."""

    def __init__(self, base_url: str, *, headers: Any, timeout: float, connect_timeout: float,
                 max_connections: int, keepalive_s: float) -> None:
        self._base = base_url.rstrip("/")
        self._session = requests.Session()
        self._session.headers.update(headers)
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max_connections, max_retries=0)
        self._session.mount("http://", adapter)
        self._timeout = (connect_timeout, timeout)

    def request(self, method: str, path: str, body: bytes | None) -> Answer:
        try:
            r = self._session.request(method, self._base + path, data=body,
                                      timeout=self._timeout)
        except requests.RequestException as exc:
            raise TransportFailure(str(exc)) from exc
        return r.status_code, r.content, r.headers.get("retry-after")

    def close(self) -> None:
        self._session.close()


class CannedSync:
    """No I/O: every request answers a debit's body (the library's own cost)."""

    ANSWER = (b'{"tx_id":"01a24436-0efb-78f4-8553-e134554c6e8e","meter":"chat",'
              b'"remaining":999999998.5,"from_allowance":1.5,"from_credits":0,'
              b'"plan_code":"bench"}')

    def __init__(self, base_url: str, **_: Any) -> None:
        pass

    def request(self, method: str, path: str, body: bytes | None) -> Answer:
        return 200, self.ANSWER, None

    def close(self) -> None:
        pass


class CannedAsync(CannedSync):
    async def request(self, method: str, path: str, body: bytes | None  # type: ignore[override]
                      ) -> Answer:
        return 200, self.ANSWER, None

    async def aclose(self) -> None:
        pass


# -- a canned HTTP server: the client's ceiling, without the service's ---------------------------
def serve_canned(port: int) -> None:
    """Answer every request with a debit's body at once (uvloop, one process): what the
    client process can do when the server costs next to nothing."""
    import re

    import uvloop

    body = CannedSync.ANSWER
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    length = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")

    class Canned(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.buffer = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                found = length.search(self.buffer, 0, end)
                size = end + 4 + (int(found[1]) if found else 0)
                if len(self.buffer) < size:
                    return
                self.buffer = self.buffer[size:]
                self.transport.write(answer)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


class CannedServer:
    """``serve_canned`` in a process of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.client", "--canned-server",
                                      str(self.port)], cwd=ROOT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("the canned server did not listen")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- the service ------------------------------------------------------------------------------
class Service:
    """``quota-gateway serve`` on a database and key prefix of its own."""

    def __init__(self, redis_url: str, admin_dsn: str, workers: int) -> None:
        self.redis_url = redis_url
        self.admin_dsn = admin_dsn
        self.workers = workers
        self.tag = f"qgbcli{secrets.token_hex(3)}"
        self.dsn = urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{self.tag}"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "WORKERS")}
        env.update(REDIS_URL=self.redis_url, DB_DSN=self.dsn, KEY_PREFIX=self.tag,
                   ENV="test", SERVICE_TOKEN=KEY)
        return env

    async def _admin(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def start(self) -> None:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.tag}"'))
        subprocess.run([QG, "migrate"], env=self.env(), cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        self.log = Path(f"/tmp/{self.tag}.log")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [QG, "serve", "--with-reconciler", "--workers", str(self.workers), "--port",
                 str(self.port)], env=self.env(), cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(urllib3.exceptions.HTTPError):
                if urllib3.request("GET", f"{self.url}/ready", timeout=1).status == 200:
                    time.sleep(1.0)  # every worker up
                    return
            time.sleep(0.2)
        raise RuntimeError(f"not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(Exception):
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.tag}" WITH (FORCE)'))
        with contextlib.suppress(Exception):
            import redis

            r = redis.Redis.from_url(self.redis_url)
            keys = list(r.scan_iter(match=f"{self.tag}:*", count=1000))
            for i in range(0, len(keys), 500):
                r.unlink(*keys[i:i + 500])
            r.close()
        with contextlib.suppress(OSError):
            self.log.unlink()

    def prepare(self, users: list[str]) -> None:
        """The bench plan on every user (huge allowances: no debit is refused)."""
        pool = urllib3.PoolManager(headers=HEADERS)
        r = pool.request("PUT", f"{self.url}/internal/billing/plans/bench", json=PLAN)
        assert r.status == 200, r.data
        for user in users:
            r = pool.request("POST", f"{self.url}/internal/billing/plan/apply",
                             json={"user_id": user, "plan_code": "bench"})
            assert r.status == 200, r.data


# -- the runs ---------------------------------------------------------------------------------
class Bodies:
    """A fresh ref for every debit, users in turn."""

    def __init__(self, users: list[str]) -> None:
        self.users = users
        self.n = 0
        self.run = secrets.token_hex(4)

    def next(self) -> tuple[str, str]:
        self.n += 1
        return self.users[self.n % len(self.users)], f"b-{self.run}-{self.n}"

    def raw(self) -> bytes:
        user, ref = self.next()
        return (f'{{"user_id":"{user}","action":"chat_tokens","units":1,"ref":"{ref}"}}'
                .encode())


def measure(calls: int, run: Callable[[], None]) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"calls": calls, "calls_per_s": round(calls / wall),
            "cpu_us_per_call": round(cpu / calls * 1e6, 1),
            "wall_us_per_call": round(wall / calls * 1e6, 1)}


async def run_concurrent(calls: int, concurrency: int,
                         one: Callable[[], Awaitable[None]]) -> None:
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def async_variants(url: str, bodies: Bodies, concurrency: int
                   ) -> dict[str, Callable[[int], Awaitable[None]]]:
    """name -> run(calls) (each makes its client, warms it, runs, closes it)."""

    async def bare_aiohttp(calls: int) -> None:
        connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=4)
        async with aiohttp.ClientSession(url, connector=connector, headers=HEADERS,
                                         skip_auto_headers=("User-Agent",)) as session:
            async def one() -> None:
                async with session.post(DEBIT, data=bodies.raw()) as r:
                    await r.read()
                    assert r.status == 200
            await run_concurrent(concurrency * 4, concurrency, one)  # warm the pool
            await timed(calls, run_concurrent(calls, concurrency, one))

    async def bare_httpx(calls: int) -> None:
        limits = httpx.Limits(max_connections=concurrency,
                              max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, headers=HEADERS, limits=limits) as http:
            async def one() -> None:
                r = await http.post(DEBIT, content=bodies.raw())
                assert r.status_code == 200
            await run_concurrent(concurrency * 4, concurrency, one)
            await timed(calls, run_concurrent(calls, concurrency, one))

    def client_on(transport: Any) -> Callable[[int], Awaitable[None]]:
        async def run(calls: int) -> None:
            extra = {} if transport is None else {"transport": transport}
            async with AsyncClient(url, KEY, max_connections=concurrency, **extra) as client:
                async def one() -> None:
                    user, ref = bodies.next()
                    await client.debit(user, "chat_tokens", 1, ref=ref)
                await run_concurrent(concurrency * 4, concurrency, one)
                await timed(calls, run_concurrent(calls, concurrency, one))
        return run

    return {"bare aiohttp": bare_aiohttp, "client on aiohttp": client_on(None),
            "bare httpx": bare_httpx, "client on httpx": client_on(HttpxAsyncTransport)}


#: The figure of the last timed section (set by ``timed``).
LAST: dict[str, float] = {}


async def timed(calls: int, work: Awaitable[None]) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    await work
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    LAST.clear()
    LAST.update({"calls": calls, "calls_per_s": round(calls / wall),
                 "cpu_us_per_call": round(cpu / calls * 1e6, 1),
                 "wall_us_per_call": round(wall / calls * 1e6, 1)})


def sync_variants(url: str, bodies: Bodies) -> dict[str, Callable[[int], dict[str, float]]]:
    def bare_urllib3(calls: int) -> dict[str, float]:
        pool = urllib3.connection_from_url(url, maxsize=1, headers=HEADERS)

        def loop(n: int) -> None:
            for _ in range(n):
                r = pool.urlopen("POST", DEBIT, body=bodies.raw(), retries=False)
                assert r.status == 200
        loop(20)
        out = measure(calls, lambda: loop(calls))
        pool.close()
        return out

    def bare_httpx(calls: int) -> dict[str, float]:
        with httpx.Client(base_url=url, headers=HEADERS) as http:
            def loop(n: int) -> None:
                for _ in range(n):
                    assert http.post(DEBIT, content=bodies.raw()).status_code == 200
            loop(20)
            return measure(calls, lambda: loop(calls))

    def bare_requests(calls: int) -> dict[str, float]:
        with requests.Session() as http:
            http.headers.update(HEADERS)
            target = url + DEBIT

            def loop(n: int) -> None:
                for _ in range(n):
                    assert http.post(target, data=bodies.raw()).status_code == 200
            loop(20)
            return measure(calls, lambda: loop(calls))

    def client_on(transport: Any) -> Callable[[int], dict[str, float]]:
        def run(calls: int) -> dict[str, float]:
            extra = {} if transport is None else {"transport": transport}
            with Client(url, KEY, **extra) as client:
                def loop(n: int) -> None:
                    for _ in range(n):
                        user, ref = bodies.next()
                        client.debit(user, "chat_tokens", 1, ref=ref)
                loop(20)
                return measure(calls, lambda: loop(calls))
        return run

    return {"bare urllib3": bare_urllib3, "client on urllib3": client_on(None),
            "bare httpx": bare_httpx, "client on httpx": client_on(HttpxSyncTransport),
            "bare requests": bare_requests, "client on requests": client_on(RequestsTransport)}


def library_only(calls: int, users: list[str]) -> dict[str, dict[str, float]]:
    """The client's own CPU per call: a canned transport, no I/O."""
    bodies = Bodies(users)
    out: dict[str, dict[str, float]] = {}
    with Client("http://canned", KEY, transport=CannedSync) as client:
        def loop() -> None:
            for _ in range(calls):
                user, ref = bodies.next()
                client.debit(user, "chat_tokens", 1, ref=ref)
        out["Client.debit"] = measure(calls, loop)

    async def run() -> None:
        async with AsyncClient("http://canned", KEY, transport=CannedAsync) as client:
            async def loop() -> None:
                for _ in range(calls):
                    user, ref = bodies.next()
                    await client.debit(user, "chat_tokens", 1, ref=ref)
            await timed(calls, loop())
    asyncio.run(run())
    out["AsyncClient.debit"] = dict(LAST)
    return out


def best(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The best round's rate and the median round's CPU per call (and every round)."""
    import statistics

    top = max(runs, key=lambda r: r["calls_per_s"])
    return {**top, "cpu_us_per_call": statistics.median(r["cpu_us_per_call"] for r in runs),
            "rounds": [(r["calls_per_s"], r["cpu_us_per_call"]) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--async-calls", type=int, default=20_000)
    parser.add_argument("--sync-calls", type=int, default=4_000)
    parser.add_argument("--httpx-calls", type=int, default=3_000,
                        help="async calls for the httpx variants")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run the async side on uvloop")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "clients" / "python" / "bench-results.json")
    parser.add_argument("--canned-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.canned_server:
        serve_canned(args.canned_server)
        return
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    dsn = os.environ.get("DB_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    users = [f"bench-{i}" for i in range(args.users)]
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "aiohttp": aiohttp.__version__, "httpx": httpx.__version__,
                    "urllib3": urllib3.__version__, "requests": requests.__version__,
                    "loop": "uvloop" if args.uvloop else "asyncio"},
        "service_workers": args.workers, "concurrency": args.concurrency,
        "library_only": library_only(20_000, users)}
    log(f"library only: {results['library_only']}")
    service = Service(redis_url, dsn, args.workers)
    try:
        service.start()
        service.prepare(users)
        bodies = Bodies(users)
        runner: Callable[[Awaitable[None]], None] = asyncio.run  # type: ignore[assignment]
        if args.uvloop:
            import uvloop

            runner = uvloop.run
        variants = async_variants(service.url, bodies, args.concurrency)
        async_runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, run in variants.items():  # httpx is slow at 32 concurrent: fewer calls
                runner(run(args.async_calls if "httpx" not in name else args.httpx_calls))
                async_runs[name].append(dict(LAST))
                log(f"async round {round_ + 1} {name}: {LAST}")
        sync = sync_variants(service.url, bodies)
        sync_runs: dict[str, list[dict[str, float]]] = {name: [] for name in sync}
        for round_ in range(args.rounds):
            for name, run_sync in sync.items():
                sync_runs[name].append(run_sync(args.sync_calls))
                log(f"sync round {round_ + 1} {name}: {sync_runs[name][-1]}")
        canned = CannedServer()
        try:
            ceiling = {name: run for name, run in
                       async_variants(canned.url, bodies, args.concurrency).items()
                       if "aiohttp" in name}
            ceiling_runs: dict[str, list[dict[str, float]]] = {name: [] for name in ceiling}
            for round_ in range(args.rounds):
                for name, run in ceiling.items():
                    runner(run(args.async_calls))
                    ceiling_runs[name].append(dict(LAST))
                    log(f"canned server round {round_ + 1} {name}: {LAST}")
        finally:
            canned.stop()
        results["async_32"] = {name: best(runs) for name, runs in async_runs.items()}
        results["async_32_canned_server"] = {name: best(runs)
                                             for name, runs in ceiling_runs.items()}
        results["sync_serial"] = {name: best(runs) for name, runs in sync_runs.items()}
    finally:
        service.stop()
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict[str, Any]) -> str:
    lines = [f"async, {results['concurrency']} concurrent ({results['machine']['loop']}):",
             "| variant | calls/s | client CPU µs/call |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['calls_per_s']:,} | {r['cpu_us_per_call']} |"
              for name, r in results["async_32"].items()]
    lines += ["", f"async, {results['concurrency']} concurrent, against a canned-answer server:",
              "| variant | calls/s | client CPU µs/call |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['calls_per_s']:,} | {r['cpu_us_per_call']} |"
              for name, r in results["async_32_canned_server"].items()]
    lines += ["", "sync, serial:", "| variant | calls/s | µs/call (wall) | client CPU µs/call |",
              "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['calls_per_s']:,} | {r['wall_us_per_call']} | "
              f"{r['cpu_us_per_call']} |" for name, r in results["sync_serial"].items()]
    lines += ["", "library only (canned answers, no I/O):"]
    lines += [f"| {name} | {r['cpu_us_per_call']} µs CPU/call |"
              for name, r in results["library_only"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
