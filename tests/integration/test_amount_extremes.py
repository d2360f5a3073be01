"""Every route that reads an amount answers 422 naming the field, whatever the exponent or
the number of digits, written as a JSON number or as a string: never a 500, and nothing
changes (issue #17, defect 1: Decimal cannot hold an exponent beyond about 10**18)."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import orjson
import pytest

from core.clock import FixedClock
from core.settings import Settings
from tests.payment_support import new_payment, notification, payment_object, rsa_key, sign
from tests.payment_support import public_pem as public_pem_of
from tests.support import CREDIT, WEBHOOK, app_client, new_ref, new_user, unique_plan

SIGNER = rsa_key()
#: Texts of numbers: exponents Decimal cannot hold, each way, and absurd digit counts; none
#: is a valid amount anywhere.
EXTREMES = [
    "1e30502152041048165961590941029380720",
    "1e-30502152041048165961590941029380720",
    "-1e30502152041048165961590941029380720",
    "2.5E+99999999999999999999",
    "1e" + "9" * 5000,
    "9" * 5000,
    "0." + "0" * 5000 + "1",
]

Body = Callable[[str], str]


def _raw(template: str, number: str, as_string: bool) -> bytes:
    """``template`` with ``N`` replaced by the number, bare or quoted."""
    return template.replace("N", f'"{number}"' if as_string else number).encode()


def _template(body: dict[str, object]) -> str:
    """``body`` as JSON, its value "N" left bare for the number to go in."""
    return orjson.dumps(body).decode().replace('"N"', "N")


def _routes() -> list[tuple[str, str, str, str]]:
    """(method, path, JSON body template with N for the amount, the field named)."""
    user = new_user()
    code = unique_plan()

    def plan(limit: object, price: object) -> str:
        return _template({"meters": {"chat": {"limit": limit, "period": "day"}},
                          "duration_days": 30, "price": price, "currency": "RUB"})

    def credit(**amounts: object) -> str:
        return _template({"order_id": new_ref(), "user_id": user, "plan_code": "free",
                          "units_chat": 0, "units_tpl": 0, **amounts})

    return [
        ("POST", "/internal/billing/quota/debit", _template(
            {"user_id": user, "action": "chat_tokens", "units": "N", "ref": new_ref()}),
         "units"),
        ("POST", "/internal/billing/debit",
         _template({"user_id": user, "units": "N", "ref": new_ref()}), "units"),
        ("POST", "/internal/billing/check", _template({"user_id": user, "units": "N"}),
         "units"),
        ("PUT", f"/internal/billing/plans/{code}", plan("N", 1), "meters.chat.limit"),
        ("PUT", f"/internal/billing/plans/{code}", plan(1, "N"), "price"),
        ("POST", CREDIT, credit(units_chat="N"), "units_chat"),
        ("POST", CREDIT, credit(units_tpl="N"), "units_tpl"),
        ("POST", CREDIT, credit(units_chat=1, amount="N"), "amount"),
    ]


#: Zeros written with exponents Decimal cannot hold: zero where zero is refused, and
#: exactly 0 where it is allowed (a plan limit).
ZEROS = ["-0e30502152041048165961590941029380720", "0e-30502152041048165961590941029380720"]


@pytest.mark.parametrize("number", ZEROS, ids=lambda n: n[:24])
async def test_zeros_with_extreme_exponents_are_read_as_zero(
    client: httpx.AsyncClient, number: str
) -> None:
    """A debit of such a zero is 422 on units; a plan limit of it is exactly 0."""
    for method, path, template, field in _routes()[:3]:
        response = await client.request(method, path, content=_raw(template, number, False),
                                        headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["field"] == field
    method, path, template, _ = _routes()[3]
    response = await client.request(method, path, content=_raw(template, number, True),
                                    headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["meters"]["chat"]["limit"] == 0


@pytest.fixture
def signed_settings(settings: Settings) -> Settings:
    """The test settings with this module's webhook signer."""
    return settings.with_overrides(webhook_public_key=public_pem_of(SIGNER))


@pytest.mark.parametrize("as_string", [False, True], ids=["number", "string"])
@pytest.mark.parametrize("number", EXTREMES, ids=lambda n: n[:24])
async def test_extreme_amounts_are_422_naming_the_field_on_every_route(
    client: httpx.AsyncClient, number: str, as_string: bool
) -> None:
    """Each amount field of each route refuses the number with 422 and its own name."""
    for method, path, template, field in _routes():
        response = await client.request(
            method, path, content=_raw(template, number, as_string),
            headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (path, field, response.text)
        error = response.json()["error"]
        if field.startswith("meters.") and number.isdigit() and not as_string:
            # msgspec refuses an integer of thousands of digits while decoding, and its
            # path names a dict's key as [...]
            field = "meters[...].limit"
        assert error["field"] == field, (path, error)
        if method == "PUT":  # a plan refused is not created
            code = path.rsplit("/", 1)[1]
            assert (await client.get(f"/internal/billing/plans/{code}")).status_code == 404


@pytest.mark.parametrize("number", EXTREMES, ids=lambda n: n[:24])
async def test_extreme_amounts_in_a_payment_notification_are_dead_letters_naming_the_field(
    signed_settings: Settings, clock: FixedClock, number: str
) -> None:
    """The webhook's amount and its metadata's units: 422 naming the field, kept as a dead
    letter, nothing credited."""
    cases = [
        (payment_object(new_payment(), new_user(), "free", amount=number),
         "object.amount.value"),
        (payment_object(new_payment(), new_user(), "free", units_chat=number),
         "object.metadata.units_chat"),
    ]
    async with app_client(signed_settings, clock) as http:
        for obj, field in cases:
            body = notification("payment.succeeded", obj)
            # the JSON-number form as well: the object's amount written without quotes
            for raw in (body, re.sub(rb'"(-?[0-9][0-9.eE+-]*)"', rb"\1", body)):
                response = await http.post(WEBHOOK, content=raw,
                                           headers={"X-Signature": sign(SIGNER, raw),
                                                    "Content-Type": "application/json"})
                assert response.status_code == 422, (field, response.text)
                error = response.json()["error"]
                if raw is not body and number.isdigit():
                    # an integer of thousands of digits fails the decoder itself, before
                    # any field is read: named as out of range, without a field
                    assert (error["code"], error["field"]) == ("invalid_notification", None)
                    assert "out of range" in error["message"]
                else:
                    assert error["field"] == field
                assert response.json()["dead_letter_id"] > 0
            user = obj["metadata"]["user_id"]
            check = await http.get(f"/internal/billing/quota/check/{user}")
            assert check.json()["plan_code"] == "free"
