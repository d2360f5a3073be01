"""The client library (clients/python, issue #21) against the real service over HTTP.

The module starts ``quota-gateway serve --with-reconciler`` as a subprocess (as the smoke
test does) on the session's Redis and PostgreSQL, in a database and under a key prefix of
its own, and drives it with ``Client`` (urllib3) and ``AsyncClient`` (aiohttp): every
method, the typed errors, a duplicate ref returned as the original result, and retries
through a loopback TCP proxy that forwards a request and drops the connection before the
answer (the retry must not debit twice) or answers 503 itself. The hold context managers'
sequencing and the retry policy are also checked on a scripted transport (no I/O).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from quota_gateway_client import (
    NO_RETRY,
    AsyncClient,
    Client,
    ConnectionFailed,
    DebitResult,
    Forbidden,
    HoldReleased,
    InsufficientQuota,
    InvalidInput,
    QuotaGatewayError,
    RetryPolicy,
    TransportFailure,
    Unauthorized,
    Unavailable,
)

from ops.devservers import free_port
from ops.lifecycle import stop_processes
from tests.conftest import Servers, _with_database
from tests.support import KEY, new_ref, new_user

ROOT = Path(__file__).resolve().parents[2]
READER_KEY = "reader-key-0123456789"  # a caller with the read scope only
FAST = RetryPolicy(attempts=4, total_s=5.0, backoff_s=0.01, max_backoff_s=0.05)


# -- the service ----------------------------------------------------------------------------
class Service:
    """The running ``serve`` subprocess and where it answers."""

    def __init__(self, url: str, port: int, dsn: str) -> None:
        self.url, self.port, self.dsn = url, port, dsn


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float
                ) -> None:
    import urllib3

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = log.read_text(errors="replace")
            raise AssertionError(f"the service exited during start-up:\n{said[-4000:]}")
        with contextlib.suppress(urllib3.exceptions.HTTPError):
            if urllib3.request("GET", f"{url}/ready", timeout=2, retries=False).status == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"not ready in {seconds}s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
async def service(servers: Servers, template_database: str,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    """``quota-gateway serve --with-reconciler`` on a database and key prefix of its own."""
    tag = f"qgcli{secrets.token_hex(4)}"
    admin = await asyncpg.connect(servers.admin_dsn)
    await admin.execute(f'CREATE DATABASE "{tag}" TEMPLATE "{template_database}"')
    dsn = _with_database(servers.admin_dsn, tag)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "WORKERS")}
    env.update(REDIS_URL=servers.redis_url, DB_DSN=dsn, KEY_PREFIX=tag, ENV="test",
               CALLER_KEYS=json.dumps({"reader": {"key": READER_KEY, "scopes": ["read"]}}))
    log = tmp_path_factory.mktemp("client") / "serve.log"
    with log.open("wb") as out:  # a file, not a pipe: nothing reads it while it runs
        process = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "ops.cli", "serve", "--with-reconciler", "--port",
             str(port)], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(_wait_ready, url, process, log, 60)
        yield Service(url, port, dsn)
    finally:
        await asyncio.to_thread(stop_processes, [process], 30)
        await admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')
        await admin.close()
        r = redis.Redis.from_url(servers.redis_url)
        keys = list(r.scan_iter(match=f"{tag}:*", count=1000))
        for i in range(0, len(keys), 500):
            r.unlink(*keys[i:i + 500])
        r.close()


@pytest.fixture
def client(service: Service) -> Iterator[Client]:
    with Client(service.url, KEY, retry=FAST) as c:
        yield c


@pytest.fixture
async def aclient(service: Service) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(service.url, KEY, retry=FAST) as c:
        yield c


def flushed(client: Client, user: str, expect: int, seconds: float = 15) -> list[Any]:
    """The user's ledger once it holds ``expect`` rows (the reconciler flushes it), then
    a little later again: a row more would show."""
    deadline = time.monotonic() + seconds
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = list(client.iter_transactions(user))
        if len(rows) >= expect:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the reconciler's flush block is 200 ms: anything more would be here
    return list(client.iter_transactions(user))


# -- a loopback TCP proxy that fails on purpose ----------------------------------------------
class FaultyProxy:
    """Forwards TCP to the service. While ``drops`` > 0, a connection whose answer starts
    to arrive is reset instead of answered (the request was processed: the debit is made);
    while ``refusals`` > 0, a request is read and answered 503 by the proxy itself."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.drops = 0
        self.dropped = 0
        self.refusals = 0
        self.refused = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _take(self, what: str) -> bool:
        with self._lock:
            if getattr(self, what) > 0:
                setattr(self, what, getattr(self, what) - 1)
                return True
            return False

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            body += chunk
        return head + b"\r\n\r\n" + body

    def _serve(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            while True:
                request = self._read_request(conn)
                if request is None:
                    return
                with self._lock:
                    self.requests += 1
                if self._take("refusals"):
                    self.refused += 1
                    body = b'{"error":{"code":"unavailable","message":"proxy says no",' \
                           b'"field":null}}'
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                    continue
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, 5)
                upstream.sendall(request)
                answer = self._read_answer(upstream)
                if self._take("drops"):
                    self.dropped += 1
                    self._reset(conn)  # the debit is made; the caller never hears of it
                    return
                conn.sendall(answer)
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            if upstream is not None:
                upstream.close()

    @staticmethod
    def _read_answer(upstream: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = upstream.recv(65536)
            if not chunk:
                raise OSError("upstream closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.partition(b":")[2]) for line in head.split(b"\r\n")[1:]
                      if line.partition(b":")[0].strip().lower() == b"content-length")
        while len(body) < length:
            body += upstream.recv(65536)
        return head + b"\r\n\r\n" + body


@pytest.fixture
def proxy(service: Service) -> Iterator[FaultyProxy]:
    p = FaultyProxy(service.port)
    try:
        yield p
    finally:
        p.close()


# -- quota: check, debit, typed results -------------------------------------------------------
def test_check_and_debit_return_exact_typed_results(client: Client) -> None:
    """check and debit answer typed results whose amounts are the exact decimals the
    service wrote (1.000001, 0.1 sent from a float by its repr), never floats."""
    user = new_user()
    check = client.check(user)
    assert check.plan_code == "free"
    assert check.remain_chat == Decimal(50) and isinstance(check.remain_chat, Decimal)
    assert check.meters["chat"].limit == Decimal(50) and check.meters["chat"].period == "day"
    result = client.debit(user, "chat_tokens", "1.000001", ref="r-" + user)
    assert isinstance(result, DebitResult) and not result.duplicate
    assert result.meter == "chat" and result.plan_code == "free"
    assert result.remaining == Decimal("48.999999")  # exact: never through a float
    assert result.from_allowance == Decimal("1.000001") and result.from_credits == 0
    assert result.ref == "r-" + user
    assert client.debit(user, "chat_tokens", 0.1).remaining == Decimal("48.899999")
    assert client.debit(user, "tpl_run", Decimal("2")).meter == "template"
    assert client.check(user).remain_chat == Decimal("48.899999")


def test_a_debit_without_ref_gets_a_uuid4_ref(client: Client) -> None:
    """A debit without a ref is sent with a uuid4 the client made (result.ref), the one
    the ledger records."""
    user = new_user()
    result = client.debit(user, "chat_tokens", 1)
    assert len(result.ref) == 36 and result.ref[14] == "4"
    [row] = flushed(client, user, 1)
    assert row.ref == result.ref and row.tx_id == result.tx_id


def test_a_duplicate_ref_returns_the_original_debit(client: Client) -> None:
    """409 duplicate_ref is not an error: it is the original result, and nothing more
    was taken."""
    user = new_user()
    ref = new_ref()
    first = client.debit(user, "chat_tokens", 3, ref=ref)
    again = client.debit(user, "chat_tokens", 3, ref=ref)
    assert again.duplicate and not first.duplicate
    assert again.tx_id == first.tx_id and again.remaining == first.remaining == 47
    assert again.ref == ref
    assert client.check(user).remain_chat == 47


def test_typed_errors(service: Service, client: Client) -> None:
    """Each refusal is its class: InsufficientQuota with what remains, InvalidInput with
    the field (and ref_reused), Unauthorized, Forbidden for a key without the scope;
    none of them takes anything."""
    user = new_user()
    client.debit(user, "chat_tokens", 45)
    with pytest.raises(InsufficientQuota) as refused:
        client.debit(user, "chat_tokens", 6)
    assert refused.value.status == 403 and refused.value.code == "insufficient_quota"
    assert refused.value.remaining == Decimal(5)
    with pytest.raises(InvalidInput) as bad_action:
        client.debit(user, "no_such_action", 1)
    assert bad_action.value.field == "action" and bad_action.value.status == 422
    with pytest.raises(InvalidInput) as zero:
        client.debit(user, "chat_tokens", 0)
    assert zero.value.field == "units"
    with pytest.raises(InvalidInput) as local:  # refused before any request
        client.debit(user, "chat_tokens", "ten")
    assert local.value.field == "units" and local.value.status is None
    ref = new_ref()
    client.debit(user, "chat_tokens", 1, ref=ref)
    with pytest.raises(InvalidInput) as reused:
        client.debit(user, "chat_tokens", 2, ref=ref)
    assert reused.value.code == "ref_reused" and reused.value.field == "ref"
    with Client(service.url, "not-the-key") as stranger, pytest.raises(Unauthorized) as who:
        stranger.check(user)
    assert who.value.status == 401
    with Client(service.url, READER_KEY) as reader:
        assert reader.check(user).remain_chat == 4
        with pytest.raises(Forbidden) as scope:  # a Forbidden is an Unauthorized
            reader.debit(user, "chat_tokens", 1)
    assert isinstance(scope.value, Unauthorized) and scope.value.code == "forbidden"
    assert client.check(user).remain_chat == 4


# -- the balance API, credits, the ledger -------------------------------------------------------
def test_credit_then_balance_api(client: Client) -> None:
    """credit (a repeated order: the original, duplicate=True; another content:
    order_reused), then the seed-002 balance, check and debit (a repeated ref: the
    original balance and tx_id)."""
    user = new_user()
    order = f"order-{secrets.token_hex(6)}"
    credit = client.credit(order, user, "pro_month", units_chat="12.5", amount="990.00",
                           currency="RUB")
    assert not credit.duplicate and credit.plan_code == "pro_month"
    assert credit.credits == {"chat": Decimal("12.5")} and credit.status == "active"
    again = client.credit(order, user, "pro_month", units_chat="12.5", amount="990.00",
                          currency="RUB")
    assert again.duplicate and again.tx_id == credit.tx_id  # the original, once
    with pytest.raises(InvalidInput) as reused:
        client.credit(order, user, "pro_month", units_chat=13)
    assert reused.value.code == "order_reused"
    balance = client.balance(user)
    assert balance.plan.plan_code == "pro_month" and balance.plan.status == "active"
    assert balance.balance == Decimal(2000)
    assert client.balance_check(user, 3).allowed
    assert not client.balance_check(user, 2001).allowed
    ref = new_ref()
    debit = client.balance_debit(user, "2.5", ref=ref, reason="export")
    assert debit.balance == Decimal("1997.5") and not debit.duplicate
    repeat = client.balance_debit(user, "2.5", ref=ref, reason="export")
    assert repeat.duplicate and repeat.tx_id == debit.tx_id and repeat.balance == debit.balance
    with pytest.raises(InsufficientQuota) as refused:
        client.balance_debit(user, 5000)
    assert refused.value.remaining == Decimal("1997.5")
    assert client.check(user).meters["chat"].credits == Decimal("12.5")


def test_transactions_pages_through_the_ledger(client: Client) -> None:
    """transactions pages newest first with next_before; iter_transactions walks them all."""
    user = new_user()
    results = [client.debit(user, "chat_tokens", "0.5") for _ in range(5)]
    rows = flushed(client, user, 5)
    # newest first; debits of one millisecond (Redis's time) in the order of their tx ids,
    # which no longer follow the order they were made in (core/refs.py, debit_tx)
    assert sorted(r.tx_id for r in rows) == sorted(r.tx_id for r in results)
    times = [r.occurred_at for r in rows]
    assert times == sorted(times, reverse=True)
    assert all(r.amount == Decimal("-0.5") and r.kind == "debit" for r in rows)
    page = client.transactions(user, limit=2)
    assert len(page.transactions) == 2 and page.next_before
    rest = client.transactions(user, limit=10, before=page.next_before)
    assert [r.tx_id for r in page.transactions + rest.transactions] == [r.tx_id for r in rows]
    assert rest.next_before is None or not client.transactions(
        user, before=rest.next_before).transactions


# -- retries: a dropped connection, 503s, nothing listening -------------------------------------
def test_a_retry_after_a_dropped_connection_debits_once(client: Client,
                                                        proxy: FaultyProxy) -> None:
    """The proxy forwards the debit, the service makes it, the connection is reset before
    the answer; the retry carries the same (made-up) ref and gets the original back."""
    user = new_user()
    with Client(proxy.url, KEY, retry=FAST) as through:
        proxy.drops = 1
        result = through.debit(user, "chat_tokens", 7)
    assert proxy.dropped == 1 and proxy.requests == 2
    assert result.duplicate and result.remaining == 43  # the first attempt's debit
    assert client.check(user).remain_chat == 43  # taken once
    [row] = flushed(client, user, 1)
    assert row.tx_id == result.tx_id and row.ref == result.ref and row.amount == -7


async def test_an_async_retry_after_a_dropped_connection_debits_once(
        client: Client, proxy: FaultyProxy) -> None:
    """The same through AsyncClient (a pooled connection reset after the debit), and a
    batch whose answer is lost: its retry returns every item once."""
    user = new_user()
    async with AsyncClient(proxy.url, KEY, retry=FAST) as through:
        await through.debit(user, "chat_tokens", 1, ref=new_ref())  # a pooled connection
        proxy.drops = 1
        ref = new_ref()
        result = await through.debit(user, "chat_tokens", 2, ref=ref)
        assert proxy.dropped == 1 and result.duplicate and result.ref == ref
        assert result.remaining == 47
        proxy.drops = 1  # a batch too: every item once
        items = [(user, "chat_tokens", 1), (user, "chat_tokens", 2, ref)]
        batch = await through.debit_batch(items)
    assert proxy.dropped == 2
    assert [type(r) for r in batch] == [DebitResult, DebitResult]
    assert batch[0].duplicate and batch[1].duplicate and batch[1].tx_id == result.tx_id
    assert client.check(user).remain_chat == 46
    assert len(flushed(client, user, 3)) == 3


def test_503s_are_retried_with_the_same_ref_then_raised(client: Client,
                                                        proxy: FaultyProxy) -> None:
    """503s (from the proxy) are retried; past the attempts, Unavailable with retry_after."""
    user = new_user()
    with Client(proxy.url, KEY, retry=FAST) as through:
        proxy.refusals = 2
        result = through.debit(user, "chat_tokens", 1)
        assert proxy.refused == 2 and not result.duplicate and result.remaining == 49
        proxy.refusals = 10
        with pytest.raises(Unavailable) as gave_up:
            through.debit(user, "chat_tokens", 1)
    assert gave_up.value.status == 503 and gave_up.value.retry_after == 0
    assert proxy.refused == 2 + FAST.attempts
    assert client.check(user).remain_chat == 49


def test_nothing_listening_is_a_connection_failure_within_the_time_bound() -> None:
    """Refused connections are retried within total_s, then ConnectionFailed (an
    Unavailable)."""
    port = free_port()  # closed again: connections are refused
    policy = RetryPolicy(attempts=5, total_s=0.3, backoff_s=0.1, max_backoff_s=0.2)
    with Client(f"http://127.0.0.1:{port}", KEY, retry=policy) as nowhere:
        started = time.monotonic()
        with pytest.raises(ConnectionFailed) as failed:
            nowhere.debit(new_user(), "chat_tokens", 1)
    assert time.monotonic() - started < 1.0
    assert isinstance(failed.value, Unavailable)


# -- batch ------------------------------------------------------------------------------------
def test_debit_batch_answers_each_item_in_order(client: Client) -> None:
    """A batch answers each item as a single debit would, in order: results, errors
    returned (not raised), a duplicate ref as the original."""
    user, rich = new_user(), new_user()
    ref = new_ref()
    first = client.debit(user, "chat_tokens", 5, ref=ref)
    results = client.debit_batch([
        (user, "chat_tokens", 10),
        {"user_id": user, "action": "chat_tokens", "units": 100},  # more than is left
        (user, "chat_tokens", 5, ref),  # already made: the original
        {"user_id": user, "action": "nope", "units": 1},
        (rich, "tpl_run", "1.5"),
    ])
    assert len(results) == 5
    ok, short, dup, bad, other = results
    assert isinstance(ok, DebitResult) and ok.remaining == 35 and len(ok.ref) == 36
    assert isinstance(short, InsufficientQuota) and short.remaining == 35
    assert isinstance(dup, DebitResult) and dup.duplicate and dup.tx_id == first.tx_id
    assert isinstance(bad, InvalidInput) and bad.field == "action"
    assert isinstance(other, DebitResult) and other.meter == "template"
    assert other.remaining == Decimal("3.5")
    assert client.check(user).remain_chat == 35


# -- async ------------------------------------------------------------------------------------
async def test_async_client_methods(aclient: AsyncClient) -> None:
    """AsyncClient: 40 concurrent debits over its pool each taken once, errors, a
    duplicate, credit, the balance API, the ledger, batches in chunks."""
    user = new_user()
    assert (await aclient.check(user)).remain_chat == 50
    results = await asyncio.gather(*(aclient.debit(user, "chat_tokens", 1) for _ in range(40)))
    assert len({r.tx_id for r in results}) == 40
    assert sorted(r.remaining for r in results) == list(range(10, 50))
    with pytest.raises(InsufficientQuota) as refused:
        await aclient.debit(user, "chat_tokens", 11)
    assert refused.value.remaining == 10
    again = await aclient.debit(user, "chat_tokens", 1, ref=results[0].ref)
    assert again.duplicate and again.tx_id == results[0].tx_id
    credit = await aclient.credit(f"order-{secrets.token_hex(5)}", user, "pro_month",
                                  units_tpl=3)
    assert credit.credits == {"template": 3}
    assert (await aclient.balance(user)).plan.plan_code == "pro_month"
    assert (await aclient.balance_check(user, 1)).allowed
    assert (await aclient.balance_debit(user, 1, reason="x")).balance == 1999
    rows = []
    deadline = time.monotonic() + 15
    while len(rows) < 43 and time.monotonic() < deadline:
        rows = [r async for r in aclient.iter_transactions(user, page=7)]
        await asyncio.sleep(0.1)
    assert len(rows) == 43  # 40 debits, the credit's plan and credit rows, the balance debit
    page = await aclient.transactions(user, limit=3)
    assert [r.tx_id for r in page.transactions] == [r.tx_id for r in rows[:3]]
    assert await aclient.debit_batch([]) == []  # nothing to send: no request
    many = await aclient.debit_batch([(new_user(), "tpl_run", 1) for _ in range(7)], chunk=3)
    assert [getattr(r, "remaining", r) for r in many] == [4] * 7


# -- holds against the service ------------------------------------------------------------------
def test_reserve_settle_release_extend(client: Client) -> None:
    """reserve (a repeated ref: the same hold), extend, settle below the estimate (the
    rest given back; a repeat: the first result), release, a settle after a release, and
    a settle beyond what is left: InsufficientQuota with available, or partial."""
    user = new_user()
    ref = new_ref()
    hold = client.reserve(user, "chat_tokens", 10, ttl_s=30, ref=ref)
    assert hold.meter == "chat" and hold.remaining == 40 and hold.hold_id
    assert client.reserve(user, "chat_tokens", 10, ttl_s=30, ref=ref).hold_id == hold.hold_id
    assert client.check(user).remain_chat == 40
    extended = client.extend(hold.hold_id, 60)
    assert extended.hold_id == hold.hold_id and extended.expires_at
    settled = client.settle(hold.hold_id, 4)
    assert settled.settled == 4 and settled.released == 6 and settled.remaining == 46
    assert client.settle(hold.hold_id, 4).tx_id == settled.tx_id  # a repeat: the first
    other = client.reserve(user, "chat_tokens", 5)
    released = client.release(other.hold_id)
    assert released.released == 5 and released.remaining == 46
    with pytest.raises(HoldReleased):
        client.settle(other.hold_id, 1)
    big = client.reserve(user, "chat_tokens", 40)
    with pytest.raises(InsufficientQuota) as short:
        client.settle(big.hold_id, 50)
    assert short.value.available == 46
    assert client.settle(big.hold_id, 50, partial=True).settled == 46
    assert client.check(user).remain_chat == 0


def test_the_hold_context_manager_settles_the_actual_or_releases(client: Client
                                                                  ) -> None:
    """with client.hold(...): the actual is settled on exit, an exception releases the
    hold and goes on, a reserve refused never enters the block."""
    user = new_user()
    with client.hold(user, "chat_tokens", 20, ttl_s=30) as h:
        assert client.check(user).remain_chat == 30
        h.actual = "7.5"
    assert h.result is not None and h.result.settled == Decimal("7.5")
    assert client.check(user).remain_chat == Decimal("42.5")
    with pytest.raises(RuntimeError, match="stream broke"), \
            client.hold(user, "chat_tokens", 20) as h2:
        raise RuntimeError("stream broke")
    assert h2.result is not None and h2.result.released == 20
    assert client.check(user).remain_chat == Decimal("42.5")
    with pytest.raises(InsufficientQuota), client.hold(user, "chat_tokens", 100):
        pytest.fail("entered without a reservation")


async def test_the_async_hold_context_manager(aclient: AsyncClient) -> None:
    """async with client.hold(...): extend inside, the actual settled; an error releases."""
    user = new_user()
    async with aclient.hold(user, "chat_tokens", 10) as h:
        await h.extend(120)
        h.actual = 3
    assert (await aclient.check(user)).remain_chat == 47
    with pytest.raises(ValueError, match="model failed"):
        async with aclient.hold(user, "chat_tokens", 10):
            raise ValueError("model failed")
    assert (await aclient.check(user)).remain_chat == 47


# -- the client alone, on a scripted transport ---------------------------------------------------
class Scripted:
    """A transport that answers from a script and records every request."""

    script: list[Any] = []
    sent: list[tuple[str, str, dict[str, Any] | None]] = []

    def __init__(self, base_url: str, **_: Any) -> None:
        pass

    def request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes, None]:
        Scripted.sent.append((method, path, json.loads(body) if body else None))
        step = Scripted.script.pop(0)
        if isinstance(step, Exception):
            raise step
        status, answer = step
        return status, json.dumps(answer).encode(), None

    def close(self) -> None:
        pass


class AsyncScripted(Scripted):
    async def request(self, method: str, path: str, body: bytes | None  # type: ignore[override]
                      ) -> tuple[int, bytes, None]:
        return Scripted.request(self, method, path, body)

    async def aclose(self) -> None:
        pass


@pytest.fixture
def scripted() -> Callable[..., None]:
    def load(*steps: Any) -> None:
        Scripted.script = list(steps)
        Scripted.sent = []
    return load


HOLD = {"hold_id": "h-1", "meter": "chat", "expires_at": "2026-12-05T00:00:00Z",
        "remaining": 10}


def test_hold_sequence_on_a_scripted_transport(scripted: Callable[..., None]) -> None:
    """The requests the hold context manager makes, in order, with what bodies: reserve
    with its ref and ttl, then settle (actual, or the estimate), release for an actual of
    0 or an exception, and a failed release noted on the exception it does not hide."""
    with Client("http://x", KEY, transport=Scripted, retry=NO_RETRY) as c:
        scripted((200, HOLD), (200, {"hold_id": "h-1", "tx_id": "t", "settled": 0.5,
                                     "released": 1.5, "remaining": 11.5}))
        with c.hold("u", "chat_tokens", 2, ttl_s=9, ref="r-9") as h:
            h.actual = Decimal("0.5")
        assert [s[1] for s in Scripted.sent] == ["/internal/billing/quota/reserve",
                                                "/internal/billing/quota/settle"]
        assert Scripted.sent[0][2] == {"user_id": "u", "action": "chat_tokens", "units": 2,
                                       "ref": "r-9", "ttl_s": 9}
        assert Scripted.sent[1][2] == {"hold_id": "h-1", "units": 0.5, "partial": True}
        assert h.result is not None and h.result.settled == Decimal("0.5")
        # no actual: the estimate; an actual of 0: a release; an error: a release, and a
        # release that fails does not hide the error
        scripted((200, HOLD), (200, {"hold_id": "h-1", "settled": 2}),
                 (200, HOLD), (200, {"hold_id": "h-1", "released": 2}),
                 (200, HOLD), TransportFailure("reset"))
        with c.hold("u", "chat_tokens", 2):
            pass
        with c.hold("u", "chat_tokens", 2) as h0:
            h0.actual = 0
        with pytest.raises(KeyError) as raised, c.hold("u", "chat_tokens", 2):
            raise KeyError("boom")
        assert [s[1].rsplit("/", 1)[1] for s in Scripted.sent] == [
            "reserve", "settle", "reserve", "release", "reserve", "release"]
        assert Scripted.sent[1][2] == {"hold_id": "h-1", "units": 2, "partial": True}
        assert "releasing hold h-1 failed" in raised.value.__notes__[0]


async def test_async_hold_sequence_on_a_scripted_transport(
        scripted: Callable[..., None]) -> None:
    """The async hold: extend updates the reservation's expiry; a cancellation releases."""
    async with AsyncClient("http://x", KEY, transport=AsyncScripted, retry=NO_RETRY) as c:
        scripted((200, HOLD), (200, {"hold_id": "h-1", "expires_at": "later"}),
                 (200, {"hold_id": "h-1", "settled": 1}),
                 (200, HOLD), (200, {"hold_id": "h-1", "released": 2}))
        async with c.hold("u", "chat_tokens", 2) as h:
            await h.extend(30)
            h.actual = 1
        assert h.reservation is not None and h.reservation.expires_at == "later"
        with pytest.raises(asyncio.CancelledError):
            async with c.hold("u", "chat_tokens", 2):
                raise asyncio.CancelledError
        assert [s[1].rsplit("/", 1)[1] for s in Scripted.sent] == [
            "reserve", "extend", "settle", "reserve", "release"]


def test_retries_resend_the_same_body_and_are_bounded(scripted: Callable[..., None]) -> None:
    """A reset and a 503 are retried with the very same body (the same made-up ref);
    attempts are bounded; a 500 is not retried."""
    policy = RetryPolicy(attempts=3, total_s=5, backoff_s=0.001, max_backoff_s=0.002)
    ok = {"tx_id": "t-1", "remaining": "1.5"}
    with Client("http://x", KEY, transport=Scripted, retry=policy) as c:
        scripted(TransportFailure("reset"), (503, {"error": {"code": "unavailable"}}),
                 (200, ok))
        assert c.debit("u", "chat_tokens", 1).remaining == Decimal("1.5")
        bodies = [s[2] for s in Scripted.sent]
        assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
        scripted(*[TransportFailure("reset")] * 5)
        with pytest.raises(ConnectionFailed, match="3 attempts"):
            c.debit("u", "chat_tokens", 1)
        assert len(Scripted.sent) == 3
        scripted((500, {"error": {"code": "internal", "message": "bug"}}))
        with pytest.raises(QuotaGatewayError, match="bug"):  # not retried
            c.check("u")
        assert len(Scripted.sent) == 1


def test_the_retry_policy_jitters_within_its_bounds() -> None:
    """Waits grow, jitter between half and all of their ceiling, stop at the attempt and
    time bounds, and honour Retry-After; the generator is seeded."""
    policy = RetryPolicy(attempts=5, total_s=3, backoff_s=0.1, max_backoff_s=0.4,
                         rng=random.Random(21))
    waits = [policy.delay(n, 0, None) for n in (1, 2, 3, 4) for _ in range(200)]
    assert all(w is not None for w in waits)
    firsts, fourths = waits[:200], waits[600:]
    assert all(0.05 <= w <= 0.1 for w in firsts if w is not None)
    assert all(0.2 <= w <= 0.4 for w in fourths if w is not None)
    assert len({round(w, 6) for w in firsts if w is not None}) > 100  # jitter
    assert policy.delay(5, 0, None) is None  # out of attempts
    assert policy.delay(1, 2.99, None) is None  # out of time
    assert (policy.delay(1, 0, "1") or 0) >= 1  # Retry-After honoured
