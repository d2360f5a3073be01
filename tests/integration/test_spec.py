"""The spec against the service, part by part: what /openapi.json calls valid is what the
service takes (tests/integration/test_schemathesis.py samples the whole; these pin the
parts a sample may miss: every code point of an id, the edges of amounts and expiries, the
405s of every path). Schemas are read with jsonschema_rs, the validator schemathesis uses
(ECMA-262 regexes)."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import jsonschema_rs
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.amounts import AmountError, read_amount, to_micro
from core.ids import PRINTABLE_PATTERN, USER_ID_PATTERN, user_id_problem
from core.settings import Settings
from hotpath.openapi import build_spec
from hotpath.routes import operations
from hotpath.schemas import PRINTABLE_TEXT, USER_ID_TEXT, PaymentNotificationIn
from payments.notifications import EVENTS
from tests.support import T0, new_user

APPLY = "/internal/billing/plan/apply"


class _NoHandlers:
    """Stands in for the handlers when only the route table's shape is needed."""

    def __getattr__(self, name: str) -> Any:
        async def handler(request: Any, caller: Any) -> None:
            raise AssertionError("not served")

        return handler


def _spec(settings: Settings | None = None) -> dict[str, Any]:
    return build_spec(settings or Settings(env="test"), operations(_NoHandlers()),  # type: ignore[arg-type]
                      now_ms=T0)


def _property(spec: dict[str, Any], model: str, name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator(spec["components"]["schemas"][model]
                                              ["properties"][name])


def _code_points() -> list[str]:
    """Every code point of the BMP (controls, blanks, U+FEFF, line separators are all
    there) and every 97th beyond it; surrogates are no text."""
    return [chr(c) for c in [*range(0x10000), *range(0x10000, sys.maxunicode + 1, 97)]
            if not 0xD800 <= c <= 0xDFFF]


def test_ids_and_refs_read_alike_in_the_spec_and_the_service() -> None:
    """For every code point alone, after a blank, before and after a letter: the spec's
    user_id and ref schemas (ECMA) accept exactly what the service does (core.ids for
    paths, queries and the webhook; the body models' patterns for bodies)."""
    spec = _spec()
    user_id, ref = _property(spec, "QuotaDebitIn", "user_id"), _property(spec, "QuotaDebitIn",
                                                                          "ref")
    for char in _code_points():
        for text in (char, f" {char}", f"{char}a", f"a{char}"):
            service = user_id_problem(text) is None
            assert service == user_id.is_valid(text) == bool(re.search(USER_ID_TEXT, text)), \
                f"user_id {text!r}"
            service = re.match(PRINTABLE_PATTERN, text) is not None
            assert service == ref.is_valid(text) == bool(re.search(PRINTABLE_TEXT, text)), \
                f"ref {text!r}"
    assert not user_id.is_valid("a" * 129) and user_id.is_valid("a" * 128)
    assert re.match(USER_ID_PATTERN, "\ufeff") and user_id.is_valid("\ufeff")  # not blank


def _service_reads(value: Any, allow_zero: bool) -> bool:
    try:
        to_micro(read_amount(value), allow_zero=allow_zero)
    except (AmountError, TypeError, ValueError):
        return False
    return True


def test_amounts_read_alike_in_the_spec_and_the_service() -> None:
    """Units (over 0) and credits (from 0), as JSON numbers and as strings: the spec
    accepts what the service does, but for a string with an exponent, which the service
    reads and the spec's pattern (plain digits) does not name."""
    spec = _spec()
    texts = ["0", "0.0", "-0", "-0.000", "1", "2.5", "2.50000000", "0.000001", "0.0000001",
             "1.0000001", "999999999.999999", "1000000000", "1000000000.000000",
             "1000000000.000001", "1000000001", "01", "1.", ".5", "+1", " 1", "1_0", "-1",
             "12345678901", "NaN", "Infinity", ""]
    for model, field, allow_zero in (("QuotaDebitIn", "units", False),
                                     ("QuotaCreditIn", "units_chat", True),
                                     ("MeterBody", "limit", True)):
        schema = _property(spec, model, field)
        for text in texts:
            assert schema.is_valid(text) == _service_reads(text, allow_zero), (field, text)
            if re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text):  # the same digits as a number
                number = Decimal(text)
                assert schema.is_valid(float(number)) == _service_reads(number, allow_zero), \
                    (field, "number", text)
        assert _service_reads("1e3", allow_zero) and not schema.is_valid("1e3")


async def test_an_expiry_the_spec_admits_is_taken(client: httpx.AsyncClient) -> None:
    """The pattern of expires_at starts two days after the service's clock and ends with
    8998: its first instant in the furthest offset, its last, and times drawn from it are
    all taken; the day before is not in it."""
    spec = (await client.get("/openapi.json")).json()
    pattern = spec["components"]["schemas"]["PlanApplyIn"]["properties"]["expires_at"][
        "anyOf"][0]["pattern"]
    first = (datetime.fromtimestamp(T0 / 1000, UTC) + timedelta(days=2)).date()
    admitted = [f"{first}T00:00:00+23:59", "8998-12-31T23:59:59.999-23:59",
                f"{first}t12:00:00.5z"]
    assert all(re.search(pattern, text) for text in admitted)
    assert not re.search(pattern, f"{first - timedelta(days=1)}T23:59:59Z")
    assert not re.search(pattern, "8999-01-01T00:00:00Z")
    drawn: list[str] = []

    @settings(max_examples=20, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.from_regex(pattern))
    def draw(text: str) -> None:
        drawn.append(text)

    draw()
    for text in admitted + drawn:
        answer = await client.post(APPLY, json={"user_id": new_user(), "plan_code": "free",
                                                "expires_at": text})
        assert answer.status_code == 200, (text, answer.text)


async def test_every_path_answers_405_with_allow(client: httpx.AsyncClient) -> None:
    """Every operation declares 400 and 405 (with Allow), and 404 where it has a path
    parameter; every path answers a method it lacks 405 with the error envelope and an
    Allow naming all its methods."""
    spec = (await client.get("/openapi.json")).json()
    for path, methods in spec["paths"].items():
        for entry in methods.values():
            declared = entry["responses"]
            assert {"400", "405"} <= set(declared), path
            assert declared["405"]["headers"]["Allow"]["required"], path
            assert ("404" in declared) >= ("{" in path), path
        url = path.replace("{user_id}", "u").replace("{plan_code}", "free")
        answer = await client.request("TRACE", url)
        allow = sorted({m.upper() for m in methods} | ({"HEAD"} if "get" in methods else set()))
        assert answer.status_code == 405, path
        assert answer.headers["allow"] == ", ".join(allow), path
        assert answer.json()["error"]["code"] == "method_not_allowed"


def test_actions_are_the_configured_ones() -> None:
    """The action enum lists ACTION_METERS' actions that a request can name."""
    configured = Settings(env="test", action_meters=(("chat_tokens", "chat"),
                                                     ("Not-An-Action", "chat"),
                                                     ("summarize", "template")))
    action = _spec(configured)["components"]["schemas"]["QuotaDebitIn"]["properties"][
        "action"]
    assert action["enum"] == ["chat_tokens", "summarize"]


async def test_a_whole_number_with_a_zero_fraction_is_an_integer(
    client: httpx.AsyncClient,
) -> None:
    """JSON (and the spec's JSON Schema) reads 30.0 as the integer 30; 30.5 is none."""
    url = "/internal/billing/plans/twhole"
    meters = {"chat": {"limit": 10, "period": "day"}}
    ok = await client.put(url, json={"meters": meters, "duration_days": 30.0, "version": 0.0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["duration_days"] == 30
    half = await client.put(url, json={"meters": meters, "duration_days": 30.5})
    assert half.status_code == 422 and half.json()["error"]["field"] == "duration_days"


def test_the_webhook_body_names_the_events_handled() -> None:
    """The notification's event enum is the webhook's own list."""
    schema = msgspec.json.schema(PaymentNotificationIn)
    event = schema["$defs"]["PaymentNotificationIn"]["properties"]["event"]
    assert sorted(event["enum"]) == sorted(EVENTS)
