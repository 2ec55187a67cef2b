"""Webhook signatures: HMAC-SHA256 over `timestamp + "." + body`, sent as
`Graft-Signature: t=<unix seconds>,v1=<hex digest>`.

The timestamp is signed with the body, so a receiver that refuses old timestamps refuses a
captured request replayed later; the event's `id` (the same on every retry) lets it drop repeats.
verify_signature is what a receiver written in Python can copy as it is.
"""
from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Graft-Signature"
DEFAULT_TOLERANCE_S = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The Graft-Signature header's value for `body` sent now (or at `timestamp`)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = DEFAULT_TOLERANCE_S,
                     now: float | None = None) -> bool:
    """True when `header` signs exactly `body` with `secret` at a time within `tolerance_s` of now.

    `body` is the raw request body as received (parsing and re-serialising the JSON changes it).
    """
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        return False  # too old (a replay) or from a badly wrong clock
    return hmac.compare_digest(parts.get("v1", ""), signature(secret, timestamp, body))
