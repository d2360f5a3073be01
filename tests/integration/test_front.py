"""The ASGI front (hotpath/front.py): the routes it answers itself behave as through
Starlette; what it does not match goes to Starlette unchanged."""

from __future__ import annotations

import httpx
import pytest

from tests.support import KEY, new_user


async def test_what_the_front_does_not_match_is_starlettes(client: httpx.AsyncClient) -> None:
    user = new_user()
    head = await client.head(f"/internal/billing/quota/check/{user}")
    assert head.status_code == 200 and head.content == b""
    nested = await client.get(f"/internal/billing/quota/check/{user}/x")
    assert nested.status_code == 404 and nested.json()["error"]["code"] == "not_found"
    empty = await client.get("/internal/billing/quota/check/")
    assert empty.status_code == 404
    wrong = await client.put("/internal/billing/check", json={})
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


async def test_the_front_answers_with_the_same_headers_and_envelope(
    client: httpx.AsyncClient
) -> None:
    ok = await client.post("/internal/billing/check", json={"user_id": new_user(), "units": 1})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert int(ok.headers["content-length"]) == len(ok.content)
    no_key = await client.post("/internal/billing/check", json={"user_id": "u", "units": 1},
                               headers={"X-Internal-Key": ""})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "unauthorized"
    busy = await client.post("/internal/billing/check", content=b"{}",
                             headers={"Content-Type": "text/plain", "X-Internal-Key": KEY})
    assert busy.status_code == 415


async def test_a_bug_behind_the_front_is_a_500_envelope_and_logged(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    api = client._transport.app.state.api  # type: ignore[attr-defined]

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(api.engine, "check", broken)
    answer = await client.get(f"/internal/billing/quota/check/{new_user()}")
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal"
    assert "a bug" in caplog.text
