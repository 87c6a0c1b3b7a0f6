"""Webhook signatures: Standard Webhooks (`webhook-*` headers) and Knit's `X-Knit-Signature`."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac

PREFIX = "whsec_"
_BLOCK = 64  # SHA-256's block size
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: the decoded bytes of `whsec_<base64>`, else the secret's UTF-8 bytes."""
    if secret.startswith(PREFIX):
        try:
            key = base64.b64decode(secret[len(PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be followed by base64 (generate one with 'syncd secret')") from None
        if not 24 <= len(key) <= 64:
            # "whsec_" alone is an empty key: signatures anyone could forge.
            raise ValueError(f"a whsec_ secret must decode to 24 to 64 bytes, this one has {len(key)} "
                             "(generate one with 'syncd secret')")
        return key
    return secret.encode()


def check_secret(secret: str) -> str | None:
    """A warning about a usable but unusual secret, or None. Raises ValueError if unusable."""
    key = secret_key(secret)
    if not secret.startswith(PREFIX):
        weak = f" and only {len(key)} bytes long" if len(key) < 24 else ""
        return f"not a whsec_ secret{weak}; it is used as its UTF-8 bytes (generate one with 'syncd secret')"
    return None


class _Hmac:
    """HMAC-SHA256 under one key, with the key's two padded blocks hashed once (RFC 2104): each
    message then costs two hash copies instead of a fresh HMAC set-up (about half the time)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(hmac.trans_36))
        self._outer = hashlib.sha256(key.translate(hmac.trans_5C))

    def digest(self, *parts: bytes) -> bytes:
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)  # the body is hashed where it lies, not copied into one message
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class Signer:
    """The signature headers of one secret's deliveries; the secret is decoded once, not per event."""

    __slots__ = ("_standard", "_knit")

    def __init__(self, secret: str) -> None:
        self._standard = _Hmac(secret_key(secret))
        self._knit = _Hmac(secret.encode())

    def headers(self, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The signature headers of one delivery attempt (DESIGN.md §5)."""
        ts = str(timestamp)
        standard = binascii.b2a_base64(self._standard.digest(f"{event_id}.{ts}.".encode(), body), newline=False)
        # base64url without padding: a 32-byte MAC is 43 characters and one "=".
        knit = binascii.b2a_base64(self._knit.digest(body), newline=False)[:43].translate(_URLSAFE)
        return {
            "webhook-id": event_id,
            "webhook-timestamp": ts,
            "webhook-signature": "v1," + standard.decode(),
            "X-Knit-Signature": knit.decode(),
        }


@functools.lru_cache(maxsize=1024)
def signer(secret: str) -> Signer:
    """The (cached) Signer of a secret."""
    return Signer(secret)


def sign_headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The signature headers of one delivery attempt."""
    return signer(secret).headers(event_id, timestamp, body)
