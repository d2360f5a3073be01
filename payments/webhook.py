"""Payment notifications: verify, parse, process once; keep whatever cannot be processed.

Two verifiers, chosen by WEBHOOK_VERIFIER:

* ``signature``: an RSA-SHA256 (PKCS#1 v1.5) or Ed25519 signature of the raw body, base64,
  in ``X-Signature``, checked with the public key in WEBHOOK_PUBLIC_KEY;
* ``yookassa``: the sender must be in YooKassa's networks (behind a trusted proxy, the
  forwarded address), and the object is fetched again from the provider's API; only that
  answer is trusted.

The body is YooKassa's notification format: ``{"type": "notification", "event":
"payment.succeeded" | "payment.canceled" | "refund.succeeded", "object": {...}}``; a
payment's ``metadata`` carries ``user_id``, ``plan_code``, optionally ``units_chat``,
``units_tpl`` and ``order_id`` (default: the payment id).

A notification that fails verification or cannot be processed is stored whole in
``dead_letters`` and answered 4xx; a failure of our PostgreSQL (or of the provider's API)
answers 503 so the sender retries.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import httpx
import msgspec
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from core import metrics
from core.amounts import AmountError, read_amount, to_micro
from core.errors import DependencyUnavailable, NotFound, OrderReused, QuotaError, Rejected
from core.ids import MAX_REF, PRINTABLE_PATTERN, user_id_problem
from core.settings import Settings
from payments.credits import CreditOrder, Payments

log = logging.getLogger("quota_gateway.webhook")

#: The status each event's object must have (as the verified source says).
EVENTS = {"payment.succeeded": "succeeded", "payment.canceled": "canceled",
          "refund.succeeded": "succeeded"}
#: JSON with every non-integer number as an exact Decimal (never a float).
_DECODER = msgspec.json.Decoder(float_hook=Decimal)
#: Headers never stored with a dead letter.
SECRET_HEADERS = frozenset({"authorization", "x-internal-key", "cookie", "proxy-authorization"})


@dataclass(frozen=True, slots=True)
class Notification:
    """A verified notification: the event and the object as the trusted source gave it."""

    event: str
    object_id: str
    status: str
    amount: Decimal
    currency: str
    payment_id: str  # the payment itself, or the payment a refund belongs to
    metadata: dict[str, Any] = field(default_factory=dict)


# -- parsing -------------------------------------------------------------------------------
def _text(value: Any, name: str, limit: int = MAX_REF) -> str:
    """An id or code of the object: what the API asks of its own (PRINTABLE_PATTERN)."""
    if not isinstance(value, str) or not value:
        raise Rejected(422, "invalid_notification", "must be a non-empty string", field=name)
    if len(value) > limit or re.match(PRINTABLE_PATTERN, value) is None:
        raise Rejected(422, "invalid_notification",
                       f"must be at most {limit} printable characters, not blank", field=name)
    return value


def known_event(event: object) -> str | None:
    """``event`` if it names a notification this service handles (any JSON value may
    arrive: a list or an object is unhashable, so the type is checked first), else None."""
    return event if isinstance(event, str) and event in EVENTS else None


def parse_event(body: bytes) -> tuple[str, dict[str, Any]]:
    """The event name and raw object of a notification body."""
    try:
        data = _DECODER.decode(body)
    except msgspec.DecodeError as exc:
        raise Rejected(422, "malformed_json", f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Rejected(422, "invalid_notification", "body must be a JSON object")
    event = known_event(data.get("event"))
    if event is None:
        raise Rejected(422, "unknown_event", f"event must be one of {sorted(EVENTS)}",
                       field="event")
    obj = data.get("object")
    if not isinstance(obj, dict):
        raise Rejected(422, "invalid_notification", "must be an object", field="object")
    return event, obj


def parse_object(event: str, obj: dict[str, Any]) -> Notification:
    """Check a payment or refund object (YooKassa's API v3 shape)."""
    object_id = _text(obj.get("id"), "object.id")
    status = _text(obj.get("status"), "object.status", 32)
    money = obj.get("amount")
    if not isinstance(money, dict):
        raise Rejected(422, "invalid_notification", "must be an object", field="object.amount")
    try:
        amount = read_amount(money.get("value"))
    except (TypeError, ValueError):
        raise Rejected(422, "invalid_notification", "must be a decimal amount",
                       field="object.amount.value") from None
    # the size first: quantize raises on a value past the context's 28 digits (1e100)
    if not amount.is_finite() or amount < 0 or amount > 10**15 \
            or amount != amount.quantize(Decimal("0.01")):
        raise Rejected(422, "invalid_notification",
                       "must be a non-negative amount with at most 2 decimal places",
                       field="object.amount.value")
    currency = _text(money.get("currency"), "object.amount.currency", 3)
    if not (len(currency) == 3 and currency.isascii() and currency.isupper()):
        raise Rejected(422, "invalid_notification", "must be an ISO 4217 code",
                       field="object.amount.currency")
    if event.startswith("refund."):
        if amount == 0:  # payment_refunds.amount > 0: a refund of nothing is not one
            raise Rejected(422, "invalid_notification", "a refund must be of a positive amount",
                           field="object.amount.value")
        payment_id = _text(obj.get("payment_id"), "object.payment_id")
        metadata: Any = {}
    else:
        payment_id = object_id
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise Rejected(422, "invalid_notification", "must be an object",
                           field="object.metadata")
    return Notification(event, object_id, status, amount, currency, payment_id, metadata)


def _units(metadata: dict[str, Any], name: str) -> int:
    raw = metadata.get(name)
    if raw is None or raw == "":
        return 0
    try:
        return to_micro(read_amount(raw), allow_zero=True)
    except (AmountError, TypeError, ValueError) as exc:
        raise Rejected(422, "invalid_notification", f"invalid units: {exc}",
                       field=f"object.metadata.{name}") from None


# -- verifiers -----------------------------------------------------------------------------
class Verifier(Protocol):
    """Turns a raw notification into a trusted one, or raises Rejected."""

    async def verify(self, body: bytes, headers: Mapping[str, str], sender: str
                     ) -> Notification: ...

    async def aclose(self) -> None:
        """Release connections (the provider's API client)."""


def load_public_key(text_or_path: str) -> rsa.RSAPublicKey | ed25519.Ed25519PublicKey:
    """WEBHOOK_PUBLIC_KEY: PEM text, or the path of a PEM file; RSA or Ed25519."""
    pem = text_or_path.strip()
    if not pem.startswith("-----BEGIN"):
        pem = Path(pem).read_text(encoding="ascii")
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ValueError("WEBHOOK_PUBLIC_KEY must be an RSA or Ed25519 public key")
    return key


class SignatureVerifier:
    """``X-Signature``: base64 of an RSA-SHA256 (PKCS#1 v1.5) or Ed25519 body signature."""

    def __init__(self, public_key: str) -> None:
        self.key = load_public_key(public_key) if public_key else None

    async def aclose(self) -> None:
        """Nothing to release."""

    async def verify(self, body: bytes, headers: Mapping[str, str], sender: str
                     ) -> Notification:
        if self.key is None:
            raise Rejected(401, "unverified", "no WEBHOOK_PUBLIC_KEY is configured")
        header = headers.get("x-signature")
        if not header:
            raise Rejected(401, "unverified", "X-Signature header is missing",
                           field="x-signature")
        try:
            signature = base64.b64decode(header.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise Rejected(401, "unverified", "X-Signature is not base64",
                           field="x-signature") from None
        try:
            if isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
            else:
                self.key.verify(signature, body)
        except InvalidSignature:
            raise Rejected(401, "unverified", "the signature does not match the body",
                           field="x-signature") from None
        event, obj = parse_event(body)
        return parse_object(event, obj)


def client_address(sender: str, headers: Mapping[str, str],
                   proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str:
    """The sender, or behind trusted proxies the last forwarded address they did not add."""
    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in proxies)

    if not trusted(sender):
        return sender
    forwarded = [a.strip() for a in headers.get("x-forwarded-for", "").split(",") if a.strip()]
    for address in reversed(forwarded):
        if not trusted(address):
            return address
    return sender


class YooKassaVerifier:
    """Sender address in YooKassa's networks, then the object fetched again from the API."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False)
                              for n in settings.yookassa_networks)
        self.proxies = tuple(ipaddress.ip_network(n, strict=False)
                             for n in settings.trusted_proxies)
        self.api_url = settings.yookassa_api_url.rstrip("/")
        self.client = client or httpx.AsyncClient(
            auth=(settings.yookassa_shop_id, settings.yookassa_secret_key),
            timeout=settings.provider_timeout_seconds,
        )

    async def verify(self, body: bytes, headers: Mapping[str, str], sender: str
                     ) -> Notification:
        address = client_address(sender, headers, self.proxies)
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if ip is None or not any(ip in net for net in self.networks):
            raise Rejected(403, "sender_not_allowed",
                           f"{address} is not in the provider's networks")
        event, obj = parse_event(body)
        object_id = _text(obj.get("id"), "object.id")
        kind = "refunds" if event.startswith("refund.") else "payments"
        fetched = await self._fetch(f"{self.api_url}/{kind}/{object_id}")
        if fetched.get("id") != object_id:
            raise Rejected(422, "provider_mismatch", "the provider answered another object",
                           field="object.id")
        return parse_object(event, fetched)

    async def aclose(self) -> None:
        """Close the provider API client's connections."""
        await self.client.aclose()

    async def _fetch(self, url: str) -> dict[str, Any]:
        try:
            response = await self.client.get(url)
        except httpx.HTTPError as exc:
            raise DependencyUnavailable("yookassa", f"provider API unreachable: {exc!r}") \
                from None
        if response.status_code == 404:
            raise Rejected(422, "provider_unknown", "the provider does not know this object",
                           field="object.id")
        if response.status_code != 200:
            # Our credentials or the provider itself: not the notification's fault; retry.
            raise DependencyUnavailable(
                "yookassa", f"provider API answered {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise DependencyUnavailable("yookassa", "provider API answered non-JSON") \
                from None
        if not isinstance(data, dict):
            raise DependencyUnavailable("yookassa", "provider API answered a non-object")
        return data


def make_verifier(settings: Settings) -> Verifier:
    """The verifier WEBHOOK_VERIFIER names."""
    if settings.webhook_verifier == "yookassa":
        return YooKassaVerifier(settings)
    return SignatureVerifier(settings.webhook_public_key)


# -- processing ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    """What processing a notification did."""

    status: str  # processed | duplicate
    event: str
    order_id: str | None = None
    refund_id: str | None = None


class PaymentWebhook:
    """Verify, process once, or keep as a dead letter."""

    def __init__(self, payments: Payments, verifier: Verifier) -> None:
        self.payments = payments
        self.verifier = verifier
        self.db = payments.engine.db

    async def handle(self, body: bytes, headers: Mapping[str, str], sender: str, *,
                     verify: bool = True, source: str = "webhook") -> Outcome:
        """Process one notification; Rejected means it was not (the caller stores it)."""
        if verify:
            note = await self.verifier.verify(body, headers, sender)
        else:
            note = parse_object(*parse_event(body))
        if note.status != EVENTS[note.event]:
            raise Rejected(422, "status_mismatch",
                           f"{note.event} for an object whose status is {note.status!r}",
                           field="object.status")
        if note.event == "refund.succeeded":
            refund = await self.payments.refund(note.object_id, note.payment_id, note.amount,
                                                note.currency, caller=source)
            return Outcome("duplicate" if refund.duplicate else "processed", note.event,
                           refund.order_id, refund.refund_id)
        metadata = note.metadata
        order_id = _text(metadata.get("order_id") or note.payment_id,
                         "object.metadata.order_id")
        user_id = metadata.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            raise Rejected(422, "unknown_user", "the payment names no user",
                           field="object.metadata.user_id")
        problem = user_id_problem(user_id)
        if problem is not None:
            raise Rejected(422, "invalid_notification", problem, field="object.metadata.user_id")
        plan_code = metadata.get("plan_code")
        if note.event == "payment.canceled":
            new = await self.payments.cancel(order_id, note.payment_id, user_id,
                                             plan_code if isinstance(plan_code, str) else None,
                                             note.amount, note.currency, source)
            return Outcome("processed" if new else "duplicate", note.event, order_id)
        if not isinstance(plan_code, str) or not plan_code:
            raise Rejected(422, "unknown_plan", "the payment names no plan",
                           field="object.metadata.plan_code")
        meters = self.payments.engine.action_meters  # seed 000's two credit fields
        credits = tuple(sorted(
            (meter, micro) for meter, micro in (
                (meters.get("chat_tokens", "chat"), _units(metadata, "units_chat")),
                (meters.get("tpl_run", "template"), _units(metadata, "units_tpl")))
            if micro > 0
        ))
        order = CreditOrder(order_id, user_id, plan_code, credits, note.amount, note.currency,
                            note.payment_id, source, source)
        try:
            result = await self.payments.credit(order)
        except NotFound as exc:
            raise Rejected(422, "unknown_plan", exc.message,
                           field="object.metadata.plan_code") from None
        except OrderReused as exc:
            raise Rejected(422, "order_reused", exc.message, field="object.id") from None
        return Outcome("duplicate" if result.duplicate else "processed", note.event, order_id)

    async def receive(self, body: bytes, headers: Mapping[str, str], sender: str
                      ) -> tuple[Outcome | None, Rejected | None, int | None]:
        """The HTTP side: process, or store a dead letter and say which."""
        try:
            outcome = await self.handle(body, headers, sender)
        except Rejected as exc:
            dead_letter = await self.store(body, headers, sender, exc)
            return None, exc, dead_letter
        metrics.WEBHOOKS.labels(outcome.event, outcome.status).inc()
        return outcome, None, None

    async def replay(self, dead_letter_id: int, body: bytes | None = None, *,
                     verify: bool = True) -> Outcome:
        """Process a dead letter again (optionally with a fixed body); Rejected if it still
        cannot be. A processed one is marked replayed; processing is idempotent, so a
        second replay of a credited payment answers "duplicate"."""
        row = await self.db.fetchrow("get_dead_letter", dead_letter_id)
        if row is None:
            raise NotFound(f"no dead letter {dead_letter_id}", field="id")
        try:
            outcome = await self.handle(body if body is not None else bytes(row["body"]),
                                        row["headers"], row["sender"], verify=verify,
                                        source="replay")
        except Rejected as exc:
            await self.db.fetchval("record_replay_attempt", dead_letter_id,
                                   f"rejected again: {exc.code}: {exc.message}")
            raise
        await self.db.fetchval("mark_dead_letter_replayed", dead_letter_id,
                               f"{outcome.status}: {outcome.event} {outcome.order_id or ''}"
                               .strip())
        metrics.WEBHOOKS.labels(outcome.event, f"replay_{outcome.status}").inc()
        return outcome

    async def store(self, body: bytes, headers: Mapping[str, str], sender: str,
                    exc: QuotaError) -> int:
        """Keep a notification whole (secrets in headers left out); its dead-letter id."""
        kept = {k.lower(): v for k, v in headers.items() if k.lower() not in SECRET_HEADERS}
        reason = f"{exc.code}: {exc.message}" + (f" ({exc.field})" if exc.field else "")
        dead_letter: int = await self.db.fetchval("insert_dead_letter", "webhook", sender,
                                                  kept, body, reason)
        metrics.DEAD_LETTERS.labels(exc.code).inc()
        metrics.WEBHOOKS.labels(_event_of(body), "dead_letter").inc()
        log.warning("payment notification kept as dead letter %d: %s", dead_letter, reason)
        return dead_letter


def _event_of(body: bytes) -> str:
    """The event named in a body, for the metric label only (bounded to known events)."""
    try:
        event = orjson.loads(body).get("event")
    except (orjson.JSONDecodeError, AttributeError):
        return "unknown"
    return known_event(event) or "unknown"
