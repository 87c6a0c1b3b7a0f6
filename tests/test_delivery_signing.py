"""Signature headers for every kind of secret, checked against a plain HMAC-SHA256 of each."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random

from syncd.signing import sign_headers

from test_delivery import SECRET, knit_signature, standard_signature


def test_signatures_for_every_kind_of_secret():
    rnd = random.Random(11)
    secrets = [
        SECRET,
        "whsec_" + base64.b64encode(bytes(range(24))).decode(),  # shortest allowed key
        "whsec_" + base64.b64encode(bytes(range(64))).decode(),  # longest: one whole SHA-256 block
        "short",
        "a plain secret longer than one SHA-256 block, which HMAC hashes down before use" * 2,
        "unicode ✓ secret",
    ]
    for secret in secrets:
        for body in (b"", b"{}", rnd.randbytes(465), rnd.randbytes(70_000)):
            event_id, ts = f"evt_{rnd.getrandbits(64):016x}", rnd.randrange(1_700_000_000, 1_800_000_000)
            h = sign_headers(secret, event_id, ts, body)
            assert h["webhook-id"] == event_id and h["webhook-timestamp"] == str(ts)
            assert h["X-Knit-Signature"] == knit_signature(secret, body)
            if secret.startswith("whsec_"):
                assert h["webhook-signature"] == "v1," + standard_signature(secret, event_id, str(ts), body)
            else:
                mac = hmac.new(secret.encode(), f"{event_id}.{ts}.".encode() + body, hashlib.sha256).digest()
                assert h["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
