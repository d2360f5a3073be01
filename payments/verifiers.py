"""Webhook verifiers, chosen by WEBHOOK_VERIFIER: each turns a raw notification into a
trusted one, or raises Rejected.

* ``signature``: an RSA-SHA256 (PKCS#1 v1.5) or Ed25519 signature of the raw body, base64,
  in ``X-Signature``, checked with the public key in WEBHOOK_PUBLIC_KEY;
* ``yookassa``: the sender must be in YooKassa's networks (behind a trusted proxy, the
  forwarded address), and the object is fetched again from the provider's API; only that
  answer is trusted.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from core.errors import DependencyUnavailable, Rejected
from core.settings import Settings
from payments.notifications import Notification, parse_event, parse_object, text_field


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
        object_id = text_field(obj.get("id"), "object.id")
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
