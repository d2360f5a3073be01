"""Pure parts of the payment webhook: addresses behind proxies, object checks, keys."""

from __future__ import annotations

import ipaddress
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from core.amounts import decode_hook
from core.errors import Rejected
from core.ids import user_id_problem
from hotpath.schemas import BalanceCheckIn
from payments.notifications import parse_event, parse_object, units_field
from payments.verifiers import SignatureVerifier, client_address, load_public_key
from tests.payment_support import notification, payment_object, public_pem, refund_object, sign

PROXIES = (ipaddress.ip_network("10.0.0.0/8"),)


def test_forwarded_address_is_believed_only_from_trusted_proxies() -> None:
    headers = {"x-forwarded-for": "185.71.76.5"}
    assert client_address("203.0.113.9", headers, PROXIES) == "203.0.113.9"
    assert client_address("10.0.0.2", headers, PROXIES) == "185.71.76.5"
    chain = {"x-forwarded-for": "185.71.76.5, 198.51.100.7, 10.1.1.1"}
    assert client_address("10.0.0.2", chain, PROXIES) == "198.51.100.7"  # rightmost untrusted
    assert client_address("10.0.0.2", {"x-forwarded-for": "10.9.9.9"}, PROXIES) == "10.0.0.2"
    assert client_address("10.0.0.2", {}, PROXIES) == "10.0.0.2"


@pytest.mark.parametrize(("change", "field"), [
    ({"amount": {"value": "1.001", "currency": "RUB"}}, "object.amount.value"),
    ({"amount": {"value": "NaN", "currency": "RUB"}}, "object.amount.value"),
    ({"amount": {"value": "-1.00", "currency": "RUB"}}, "object.amount.value"),
    ({"amount": {"value": "1e100", "currency": "RUB"}}, "object.amount.value"),
    ({"amount": {"value": "1.00", "currency": "rub"}}, "object.amount.currency"),
    ({"amount": "1.00"}, "object.amount"),
    ({"id": ""}, "object.id"),
    ({"id": "a\x00b"}, "object.id"), ({"id": "a\x85b"}, "object.id"),
    ({"id": "   "}, "object.id"), ({"id": "pay-1\n"}, "object.id"),
    ({"amount": {"value": "1_0", "currency": "RUB"}}, "object.amount.value"),
    ({"amount": {"value": " 3.00", "currency": "RUB"}}, "object.amount.value"),
    ({"amount": {"value": True, "currency": "RUB"}}, "object.amount.value"),
    ({"amount": {"currency": "RUB"}}, "object.amount.value"),
    ({"metadata": ["user"]}, "object.metadata"),
])
def test_bad_payment_objects_name_the_field(change: dict[str, object], field: str) -> None:
    obj = payment_object("pay-1", "user-1", "pro_month") | change
    with pytest.raises(Rejected) as caught:
        parse_object("payment.succeeded", obj)
    assert caught.value.field == field and caught.value.status == 422


def test_a_refund_of_zero_is_refused_naming_the_amount() -> None:
    """payment_refunds.amount > 0: before, a zero refund reached the INSERT and answered
    500 with no dead letter kept, and the provider retried it forever."""
    with pytest.raises(Rejected) as caught:
        parse_object("refund.succeeded", refund_object("ref-1", "pay-1", amount="0.00"))
    assert caught.value.field == "object.amount.value" and caught.value.status == 422
    assert parse_object("refund.succeeded",
                        refund_object("ref-1", "pay-1", amount="0.01")).amount == Decimal("0.01")


def test_objects_parse_exactly() -> None:
    note = parse_object("payment.succeeded", payment_object("pay-1", "u", "p", amount="990.10"))
    assert note.amount == Decimal("990.10") and note.payment_id == "pay-1"
    refund = parse_object("refund.succeeded", refund_object("rf-1", "pay-1", "5.00"))
    assert (refund.object_id, refund.payment_id) == ("rf-1", "pay-1")
    with pytest.raises(Rejected, match="non-empty"):
        parse_object("refund.succeeded", refund_object("rf-1", "", "5.00"))
    event, obj = parse_event(b'{"event": "payment.succeeded", "object": {"amount": 1.10}}')
    assert event == "payment.succeeded" and obj["amount"] == Decimal("1.10")  # never a float


async def test_signature_verifier_without_a_key_refuses_everything() -> None:
    body = notification("payment.succeeded", payment_object("pay-1", "u", "p"))
    with pytest.raises(Rejected) as caught:
        await SignatureVerifier("").verify(body, {"x-signature": "AAAA"}, "127.0.0.1")
    assert caught.value.status == 401


async def test_public_key_from_a_path_verifies_ed25519(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "pay.pem"
    path.write_text(public_pem(key))
    assert isinstance(load_public_key(str(path)), ed25519.Ed25519PublicKey)
    body = notification("payment.succeeded", payment_object("pay-1", "u", "p"))
    note = await SignatureVerifier(str(path)).verify(body, {"x-signature": sign(key, body)}, "")
    assert note.object_id == "pay-1"


@pytest.mark.parametrize("raw", ["1_0", " 3", "+5", ".5", "\u0661\u0662", "abc", True, [1]])
def test_units_in_metadata_hold_a_json_number(raw: object) -> None:
    """A payment's metadata units as the API reads amounts: a number, or a string holding
    a JSON number (Decimal() alone took "1_0" as 10 and Arabic-Indic digits as 12)."""
    with pytest.raises(Rejected) as caught:
        units_field({"units_chat": raw}, "units_chat")
    assert caught.value.field == "object.metadata.units_chat" and caught.value.status == 422


def test_units_in_metadata_are_read_exactly() -> None:
    assert units_field({"units_chat": "2.5"}, "units_chat") == 2_500_000
    assert units_field({"units_chat": Decimal("0.000001")}, "units_chat") == 1
    assert units_field({"units_chat": 10}, "units_chat") == 10_000_000
    assert units_field({}, "units_chat") == 0


@pytest.mark.parametrize("user_id", ["user-1\n", "a\x85b", " ", "a:b", ""])
def test_user_ids_from_anywhere_are_checked_as_in_bodies(user_id: str) -> None:
    """user_id_problem (paths, queries, a payment's metadata) refuses what a body's
    UserId refuses, a trailing newline included (Python's ``$`` alone lets it through)."""
    assert user_id_problem(user_id) is not None
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"user_id": user_id, "units": 1}, BalanceCheckIn, dec_hook=decode_hook)
