"""Bad input gets a clear 4xx naming the field and changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from core.ids import user_id_problem
from tests.support import debit, new_ref, new_user

URL = "/internal/billing/quota/debit"
BALANCE_DEBIT = "/internal/billing/debit"
BALANCE_CHECK = "/internal/billing/check"
#: Each POST route that takes an amount, with the fields of a valid body.
ROUTES = {
    URL: ("user_id", "action", "units", "ref"),
    BALANCE_DEBIT: ("user_id", "units", "ref", "reason"),
    BALANCE_CHECK: ("user_id", "units"),
}


def body(route: str = URL, **overrides: object) -> dict[str, object]:
    valid: dict[str, object] = {"user_id": new_user(), "action": "chat_tokens", "units": 1,
                                "ref": new_ref(), "reason": "chat_message"}
    base = {k: v for k, v in valid.items() if k in ROUTES[route]}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


BAD_BODIES = [
    ({"units": -1}, "units"), ({"units": 0}, "units"), ({"units": "NaN"}, "units"),
    ({"units": "Infinity"}, "units"), ({"units": 1.0000001}, "units"),
    ({"units": 10**10}, "units"), ({"units": "abc"}, "units"), ({"units": True}, "units"),
    ({"units": None}, "units"), ({"units": ...}, "units"),
    # a string holds a JSON number or nothing (Decimal() alone would take each of these)
    ({"units": "1_0"}, "units"), ({"units": "\u0661\u0662"}, "units"),
    ({"units": " 3 "}, "units"), ({"units": "+5"}, "units"), ({"units": "5."}, "units"),
    ({"units": ".5"}, "units"), ({"units": "007"}, "units"), ({"units": "0x10"}, "units"),
    ({"units": "sNaN"}, "units"), ({"units": ""}, "units"),
    ({"user_id": ""}, "user_id"), ({"user_id": "x" * 129}, "user_id"),
    ({"user_id": "bad\nid"}, "user_id"), ({"user_id": 5}, "user_id"),
    ({"user_id": ...}, "user_id"), ({"user_id": "a:r:b"}, "user_id"),
    ({"user_id": "a\u0085b"}, "user_id"), ({"user_id": " "}, "user_id"),
    ({"user_id": "trailing\n"}, "user_id"), ({"ref": "trailing\n"}, "ref"),
    ({"action": "chat_tokens\n"}, "action"),
    ({"ref": ""}, "ref"), ({"ref": "r" * 129}, "ref"), ({"ref": "a\x00b"}, "ref"),
    ({"ref": "a\u009bb"}, "ref"), ({"ref": " \t"}, "ref"), ({"ref": ...}, "ref"),
    ({"action": "mine_bitcoin"}, "action"), ({"action": ...}, "action"),
    ({"reason": "r" * 257}, "reason"), ({"reason": "two\nlines"}, "reason"),
    ({"reason": "c1\u0085"}, "reason"),
    ({"reason": 7}, "reason"),
    ({"extra": 1}, "extra"),
]
#: Every bad body on every route it applies to (a field the route does not take is only
#: the unknown-field case, "extra").
CASES = [(route, changes, field) for route, fields in ROUTES.items()
         for changes, field in BAD_BODIES if field in (*fields, "extra")]


@pytest.mark.parametrize(("route", "changes", "field"), CASES)
async def test_bad_bodies_are_422_naming_the_field(
    client: httpx.AsyncClient, route: str, changes: dict[str, object], field: str
) -> None:
    """Each invalid field answers 422 with error.field set, and debits nothing."""
    payload = body(route, **changes)
    response = await client.post(route, json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    user = payload.get("user_id")
    if user_id_problem(user) is None:  # a valid id: its quota is untouched
        check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
        assert check["remain_chat"] == 50
        assert check["meters"]["units"]["used"] == 0


async def test_bad_user_ids_in_the_path_and_the_query_are_422(
    client: httpx.AsyncClient
) -> None:
    """The read routes check the user id as the bodies do."""
    for bad in ("x" * 129, "bad%0Aid", "a:b", "a%C2%85b", "%20", "trailing%0A"):
        check = await client.get(f"/internal/billing/quota/check/{bad}")
        assert check.status_code == 422 and check.json()["error"]["field"] == "user_id"
        balance = await client.get(f"/internal/billing/balance?user_id={bad}")
        assert balance.status_code == 422 and balance.json()["error"]["field"] == "user_id"


async def test_exponent_1e400_is_refused(client: httpx.AsyncClient) -> None:
    """A raw JSON 1e400 (no float can hold it) is 422, not a crash."""
    raw = b'{"user_id":"u-1e400","action":"chat_tokens","units":1e400,"ref":"r"}'
    response = await client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "units"


async def test_digits_past_decimal_precision_are_refused(client: httpx.AsyncClient) -> None:
    """A raw JSON number with more digits than Decimal's 28-digit context is judged on its
    own digits: 1.0000000000000000000000000000001 is 422, not rounded to 1 and debited."""
    for units in (b"1.0000000000000000000000000000001", b"0.99999999999999999999999999999"):
        raw = b'{"user_id":"u-digits","action":"chat_tokens","units":' + units + b',"ref":"r"}'
        response = await client.post(URL, content=raw,
                                     headers={"content-type": "application/json"})
        assert response.status_code == 422, units
        assert response.json()["error"]["field"] == "units"


@pytest.mark.parametrize(("content", "ctype", "status", "code"), [
    (b'{"user_id": ', "application/json", 422, "malformed_json"),
    (b"user_id=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b'{"user_id": "u"}', "", 415, "unsupported_media_type"),
    (b"[1, 2]", "application/json", 422, "invalid"),
    (b'{"user_id":"' + b"x" * 70_000 + b'"}', "application/json", 413, "payload_too_large"),
])
async def test_malformed_requests(client: httpx.AsyncClient, content: bytes, ctype: str,
                                  status: int, code: str) -> None:
    """Broken JSON, wrong content types, non-objects and huge bodies get their 4xx."""
    headers = {"content-type": ctype} if ctype else {}
    response = await client.post(URL, content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


async def test_missing_or_wrong_key_is_401(client: httpx.AsyncClient) -> None:
    """No key and a wrong key are both 401 with the error envelope."""
    for headers in ({"X-Internal-Key": ""}, {"X-Internal-Key": "nope"}):
        response = await client.get("/internal/billing/quota/check/u", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


async def test_unknown_plan_is_404_and_bad_expiry_is_422(client: httpx.AsyncClient) -> None:
    """Applying an unknown plan is 404; a past, naive or out-of-range expires_at is 422."""
    apply = "/internal/billing/plan/apply"
    missing = await client.post(apply, json={"user_id": "u", "plan_code": "no_such_plan"})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "plan_code"
    for expires in ("2020-01-01T00:00:00Z", "2030-01-01T00:00:00",
                    "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+01:00"):
        bad = await client.post(apply, json={"user_id": "u", "plan_code": "pro_month",
                                             "expires_at": expires})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "expires_at"


async def test_bad_plan_definitions_are_422(client: httpx.AsyncClient) -> None:
    """A plan with a bad meter name, limit, period or price is refused, naming the field."""
    url = "/internal/billing/plans/tbad"
    cases = [
        ({"meters": {"Chat!": {"limit": 1, "period": "day"}}}, "meters"),
        ({"meters": {"chat": {"limit": -1, "period": "day"}}}, "meters.chat.limit"),
        ({"meters": {"chat": {"limit": 1, "period": "week"}}}, "meters[...].period"),
        ({"meters": {}, "price": "1.005"}, "price"),
        ({"meters": {}, "currency": "rub"}, "currency"),
        ({"meters": {}, "version": -1}, "version"),
        ({"meters": {"chat": {"limit": "+1", "period": "day"}}}, "meters[...].limit"),
    ]
    for payload, field in cases:
        response = await client.put(url, json=payload)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == field
    assert (await client.get(url)).status_code == 404
    trailing = await client.put(url + "%0A", json={"meters": {}})  # a code "tbad\n"
    assert trailing.status_code == 422 and trailing.json()["error"]["field"] == "plan_code"
    meter = await client.put(url, json={"meters": {"chat\n": {"limit": 1, "period": "day"}}})
    assert meter.status_code == 422 and meter.json()["error"]["field"] == "meters"


async def test_a_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    """Without Content-Length the body is counted as it arrives: over 64 KiB is 413."""
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"user_id": "'
        for _ in range(70):
            yield b"x" * 1024

    response = await client.post(URL, content=chunks(),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == \
        "payload_too_large"


async def test_a_bad_transactions_cursor_is_422(client: httpx.AsyncClient) -> None:
    """A next_before value that is not one (huge, not a number, not a UUID) is 422."""
    tx = "019ab0c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d"
    for cursor in (f"99999999999999999999_{tx}", f"-99999999999999999999_{tx}", "x_y",
                   f"12_{tx[:-1]}"):
        response = await client.get("/internal/billing/transactions",
                                    params={"user_id": "u", "before": cursor})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "before"


async def test_balance_needs_user_id(client: httpx.AsyncClient) -> None:
    """GET /balance without user_id is 422 naming it."""
    response = await client.get("/internal/billing/balance")
    assert response.status_code == 422 and response.json()["error"]["field"] == "user_id"


async def test_unknown_route_uses_the_error_envelope(client: httpx.AsyncClient) -> None:
    """404 and 405 from routing carry the same error shape."""
    assert (await client.get("/nope")).json()["error"]["code"] == "not_found"
    assert (await client.get(URL)).json()["error"]["code"] == "method_not_allowed"


async def test_debit_still_works_after_bad_requests(client: httpx.AsyncClient) -> None:
    """Sanity: a valid debit right after is accepted."""
    assert (await debit(client, new_user(), 1)).status_code == 200


async def test_an_amount_string_holding_a_json_number_is_read_exactly(
    client: httpx.AsyncClient,
) -> None:
    """The strings the README allows: the digits of a JSON number, read as that number."""
    user = new_user()
    first = await client.post(URL, json=body(user_id=user, units="0.25"))
    assert first.status_code == 200, first.text
    assert first.json()["remaining"] == 49.75
    second = await client.post(URL, json=body(user_id=user, units="1.5e1"))
    assert second.status_code == 200, second.text
    assert second.json()["remaining"] == 34.75
