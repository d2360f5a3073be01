"""The sync client (thread-safe: one pool shared by the threads that call it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from types import TracebackType
from typing import Any

from quota_gateway_client import _core as core
from quota_gateway_client import models as m
from quota_gateway_client.errors import ConnectionFailed, QuotaGatewayError
from quota_gateway_client.transports import SyncTransport, TransportFailure, Urllib3Transport


class Client:
    """The quota gateway's API, blocking.

    ``base_url`` is where the service answers (``http://127.0.0.1:8001``), ``key`` the
    ``X-Internal-Key``. Each call tries at most ``retry.attempts`` times within
    ``retry.total_s`` (``RetryPolicy``), each try within ``timeout`` seconds (connecting
    within ``connect_timeout``); ``max_connections`` connections are kept open for reuse.
    Use it as a context manager, or ``close()`` it.
    """

    def __init__(self, base_url: str, key: str, *, timeout: float = 5.0,
                 connect_timeout: float = 1.0, max_connections: int = 10,
                 keepalive_s: float = 4.0, retry: core.RetryPolicy | None = None,
                 transport: Callable[..., SyncTransport] = Urllib3Transport,
                 user_agent: str | None = None) -> None:
        self.retry = retry or core.RetryPolicy()
        self._transport = transport(
            base_url, headers=core.headers(key, user_agent), timeout=timeout,
            connect_timeout=connect_timeout, max_connections=max_connections,
            keepalive_s=keepalive_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection."""
        self._transport.close()

    def _send(self, call: core.Call) -> tuple[int, bytes]:
        """The answer to ``call``, network failures and 502/503/504 retried; the last
        failure raised when the policy gives up."""
        request = self._transport.request
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                status, data, retry_after = request(call.method, call.path, call.body)
            except TransportFailure as exc:
                wait = self.retry.delay(attempt, time.monotonic() - started, None)
                if wait is None:
                    raise ConnectionFailed(f"{call.method} {call.path.split('?')[0]}: {exc} "
                                           f"({attempt} attempts)") from exc
            else:
                if status not in core.RETRY_STATUSES:
                    return status, data
                wait = self.retry.delay(attempt, time.monotonic() - started, retry_after)
                if wait is None:
                    raise core.fail(status, data, retry_after)
            time.sleep(wait)

    def _call(self, call: core.Call) -> Any:
        status, data = self._send(call)
        return call.read(status, data, call)

    # -- quota (seed 000) ---------------------------------------------------------------
    def check(self, user_id: str) -> m.QuotaCheck:
        """What remains of the user's quota, per meter."""
        return self._call(core.check(user_id))  # type: ignore[no-any-return]

    def debit(self, user_id: str, action: str, units: core.Units, *, ref: str | None = None
              ) -> m.DebitResult:
        """Debit ``units`` of the action's meter, once per ``ref`` (one is made up when
        none is given; ``result.ref`` says which). A ref already debited returns the
        original result (``duplicate=True``). Raises ``InsufficientQuota`` (nothing taken;
        ``remaining``), ``InvalidInput`` (``field``), ``Unauthorized``, ``Unavailable``."""
        return self._call(core.debit(user_id, action, units, ref))  # type: ignore[no-any-return]

    def debit_batch(self, items: Iterable[Any], *, chunk: int = 100
                    ) -> list[m.DebitResult | QuotaGatewayError]:
        """Many debits in few requests: each item a mapping ``{user_id, action, units[,
        ref]}`` or a tuple ``(user_id, action, units[, ref])`` (a ref is made up for an item
        without one). One entry per item, in order: its ``DebitResult`` (a duplicate as the
        original) or the error it met, returned, not raised. Sent ``chunk`` items a request
        (at most the service's BATCH_MAX_ITEMS, 100); items answered 503 are sent again,
        with their refs, under the retry policy."""
        payload = [core.debit_item(item) for item in items]
        out: list[Any] = [None] * len(payload)
        pending = list(range(len(payload)))
        started = time.monotonic()
        round_ = 0
        while pending:
            round_ += 1
            again: list[int] = []
            for first in range(0, len(pending), chunk):
                part = pending[first:first + chunk]
                answer = self._call(core.debit_batch([payload[i] for i in part]))
                again += core.merge_batch(answer, part, payload, out)
            wait = self.retry.delay(round_, time.monotonic() - started, None) if again else None
            if wait is None:
                break
            pending = again
            time.sleep(wait)
        return out

    def credit(self, order_id: str, user_id: str, plan_code: str, *,
               units_chat: core.Units = 0, units_tpl: core.Units = 0,
               amount: core.Units | None = None, currency: str | None = None
               ) -> m.CreditResult:
        """Apply a paid plan and add credits, once per ``order_id`` (a repeat returns the
        original result, ``duplicate=True``)."""
        return self._call(core.credit(  # type: ignore[no-any-return]
            order_id, user_id, plan_code, units_chat, units_tpl, amount, currency))

    # -- holds ---------------------------------------------------------------------------
    def reserve(self, user_id: str, action: str, units: core.Units, *, ttl_s: float = 60,
                ref: str | None = None) -> m.Reservation:
        """Hold ``units`` of the action's meter for ``ttl_s`` seconds, once per ``ref``."""
        return self._call(  # type: ignore[no-any-return]
            core.reserve(user_id, action, units, ref, ttl_s))

    def settle(self, hold_id: str, units: core.Units, *, partial: bool = False
               ) -> m.SettleResult:
        """Debit ``units`` from the hold (more than held: the excess from the meter, or
        ``InsufficientQuota`` with ``available``; with ``partial`` what can be covered),
        and give back the rest. A repeat returns the first result. ``HoldExpired``,
        ``HoldReleased``, ``HoldSettled`` when the hold is gone."""
        return self._call(core.settle(hold_id, units, partial))  # type: ignore[no-any-return]

    def release(self, hold_id: str) -> m.ReleaseResult:
        """Give the hold's units back."""
        return self._call(core.release(hold_id))  # type: ignore[no-any-return]

    def extend(self, hold_id: str, ttl_s: float) -> m.ExtendResult:
        """Keep the hold ``ttl_s`` seconds more from now."""
        return self._call(core.extend(hold_id, ttl_s))  # type: ignore[no-any-return]

    def hold(self, user_id: str, action: str, estimate: core.Units, *, ttl_s: float = 60,
             ref: str | None = None, partial: bool = True) -> Hold:
        """``with client.hold(user, "chat_tokens", 2000) as h: ...; h.actual = used``:
        reserves ``estimate`` on entry; on a normal exit settles ``h.actual`` (the estimate
        when not set; a release when it is 0), on an exception releases and lets the
        exception through."""
        return Hold(self, user_id, action, estimate, ttl_s=ttl_s, ref=ref, partial=partial)

    # -- balance (seed 002) and the ledger ------------------------------------------------
    def balance(self, user_id: str) -> m.Balance:
        """The balance meter and the user's plan."""
        return self._call(core.balance(user_id))  # type: ignore[no-any-return]

    def balance_check(self, user_id: str, units: core.Units) -> m.BalanceCheck:
        """Whether ``units`` of the balance meter would fit (nothing is taken)."""
        return self._call(core.balance_check(user_id, units))  # type: ignore[no-any-return]

    def balance_debit(self, user_id: str, units: core.Units, *, ref: str | None = None,
                      reason: str = "") -> m.BalanceDebitResult:
        """Debit the balance meter once per ``ref`` (a repeat: the original result)."""
        return self._call(  # type: ignore[no-any-return]
            core.balance_debit(user_id, units, ref, reason))

    def transactions(self, user_id: str, *, limit: int | None = None,
                     before: str | None = None) -> m.TransactionsPage:
        """A page of the user's ledger (as flushed to PostgreSQL), newest first."""
        return self._call(core.transactions(user_id, limit, before))  # type: ignore[no-any-return]

    def iter_transactions(self, user_id: str, *, page: int = 500) -> Iterator[m.Transaction]:
        """The whole ledger of the user, newest first, page after page."""
        before: str | None = None
        while True:
            got = self.transactions(user_id, limit=page, before=before)
            yield from got.transactions
            if not got.next_before or not got.transactions:
                return
            before = got.next_before


class Hold:
    """An open hold (``Client.hold``): settle with ``actual`` on exit, release on error.

    Inside the block, ``extend(ttl_s)`` keeps it longer, and ``settle``/``release`` end it
    early (then the exit does nothing more). ``result`` is the settle's or release's."""

    def __init__(self, client: Client, user_id: str, action: str, estimate: core.Units, *,
                 ttl_s: float, ref: str | None, partial: bool) -> None:
        self.client = client
        self.user_id = user_id
        self.action = action
        self.estimate = estimate
        self.ttl_s = ttl_s
        self.ref = ref or core.new_ref()
        self.partial = partial
        self.actual: core.Units | None = None
        self.reservation: m.Reservation | None = None
        self.result: m.SettleResult | m.ReleaseResult | None = None

    @property
    def hold_id(self) -> str:
        if self.reservation is None:
            raise RuntimeError("not reserved yet: use the hold in a with statement")
        return self.reservation.hold_id

    def __enter__(self) -> Hold:
        self.reservation = self.client.reserve(self.user_id, self.action, self.estimate,
                                               ttl_s=self.ttl_s, ref=self.ref)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.result is not None:
            return
        if exc is None:
            units = self.estimate if self.actual is None else self.actual
            if Decimal(core.amount(units, "units")) == 0:
                self.release()
            else:
                self.settle(units)
            return
        try:
            self.release()
        except QuotaGatewayError as failure:  # the hold expires by itself after its ttl
            exc.add_note(f"and releasing hold {self.hold_id} failed: {failure!r}")

    def settle(self, units: core.Units | None = None, *, partial: bool | None = None
               ) -> m.SettleResult:
        """Settle now: ``units`` (default ``actual``, else the estimate)."""
        if units is None:
            units = self.estimate if self.actual is None else self.actual
        result = self.client.settle(self.hold_id, units,
                                    partial=self.partial if partial is None else partial)
        self.result = result
        return result

    def release(self) -> m.ReleaseResult:
        """Give every held unit back now."""
        result = self.client.release(self.hold_id)
        self.result = result
        return result

    def extend(self, ttl_s: float) -> m.ExtendResult:
        """Keep the hold ``ttl_s`` seconds more from now."""
        result = self.client.extend(self.hold_id, ttl_s)
        if self.reservation is not None:
            self.reservation.expires_at = result.expires_at
        return result
