"""Helpers for the payment tests: keys, signed notifications, a fake provider on loopback."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ops.devservers import free_port

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def new_payment() -> str:
    """A provider payment id no other test uses."""
    return f"pay-{secrets.token_hex(8)}"


def rsa_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: PrivateKey) -> str:
    """The PEM of a private key's public half (what WEBHOOK_PUBLIC_KEY holds)."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sign(key: PrivateKey, body: bytes) -> str:
    """The X-Signature header value for ``body``."""
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(body, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(body)
    return base64.b64encode(signature).decode()


def payment_object(payment_id: str, user: str | None, plan: str | None, *,
                   status: str = "succeeded", amount: str = "990.00", currency: str = "RUB",
                   **metadata: Any) -> dict[str, Any]:
    """A YooKassa API v3 payment object."""
    meta = {k: v for k, v in {"user_id": user, "plan_code": plan, **metadata}.items()
            if v is not None}
    return {"id": payment_id, "status": status, "paid": status == "succeeded",
            "amount": {"value": amount, "currency": currency}, "metadata": meta,
            "created_at": "2026-11-23T12:00:00.000Z"}


def refund_object(refund_id: str, payment_id: str, amount: str, *,
                  currency: str = "RUB", status: str = "succeeded") -> dict[str, Any]:
    """A YooKassa API v3 refund object."""
    return {"id": refund_id, "payment_id": payment_id, "status": status,
            "amount": {"value": amount, "currency": currency}}


def notification(event: str, obj: dict[str, Any]) -> bytes:
    """The notification body YooKassa posts."""
    return orjson.dumps({"type": "notification", "event": event, "object": obj})


@dataclass
class FakeProvider:
    """YooKassa's API on loopback: GET /v3/payments/{id} and /v3/refunds/{id}, basic auth."""

    shop_id: str = "shop-1"
    secret: str = field(default_factory=lambda: secrets.token_hex(8))
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: int = 0
    url: str = ""

    def app(self) -> Starlette:
        async def get(request: Request) -> Response:
            self.requests += 1
            expected = base64.b64encode(f"{self.shop_id}:{self.secret}".encode()).decode()
            if request.headers.get("authorization") != f"Basic {expected}":
                return JSONResponse({"type": "error", "code": "invalid_credentials"}, 401)
            found = self.objects.get(f"{request.path_params['kind']}/"
                                     f"{request.path_params['object_id']}")
            if found is None:
                return JSONResponse({"type": "error", "code": "not_found"}, 404)
            return JSONResponse(found)

        return Starlette(routes=[Route("/v3/{kind}/{object_id}", get)])


@asynccontextmanager
async def serve_provider(provider: FakeProvider) -> AsyncIterator[FakeProvider]:
    """Serve the fake provider with uvicorn on a free loopback port for the block."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(provider.app(), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "the fake provider did not start"
    provider.url = f"http://127.0.0.1:{port}/v3"
    try:
        yield provider
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
