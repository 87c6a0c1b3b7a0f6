"""Webhook signatures: Standard Webhooks (`webhook-*` headers) and Knit's `X-Knit-Signature`."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac

PREFIX = "whsec_"


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


@functools.lru_cache(maxsize=1024)
def _keys(secret: str) -> tuple[bytes, bytes]:
    """The Standard Webhooks key and Knit's key of a secret, decoded once (not per event)."""
    return secret_key(secret), secret.encode()


def sign_headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The signature headers of one delivery attempt."""
    key, knit_key = _keys(secret)
    # One-shot HMACs (C all the way), and the body hashed without first copying it into `signed`.
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    standard = base64.b64encode(mac.digest()).decode()
    knit = base64.urlsafe_b64encode(hmac.digest(knit_key, body, "sha256")).rstrip(b"=").decode()
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{standard}",
        "X-Knit-Signature": knit,
    }
