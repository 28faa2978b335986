"""Hand-built JWTs: what an attacker can send, byte for byte (PyJWT would refuse to build most)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

SECRET = "test-secret-that-is-long-enough-for-hs256"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw(header: bytes | dict[str, Any], payload: bytes | dict[str, Any], sig: bytes = b"") -> str:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{b64(h)}.{b64(p)}.{b64(sig)}"


def hs256(
    header: bytes | dict[str, Any], payload: bytes | dict[str, Any], key: bytes | str = SECRET
) -> str:
    """Signed with ``key`` whatever the header says (the secret by default: a buggy issuer)."""
    unsigned = raw(header, payload).rsplit(".", 1)[0]
    k = key.encode() if isinstance(key, str) else key
    return f"{unsigned}.{b64(hmac.new(k, unsigned.encode(), hashlib.sha256).digest())}"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "victim", "iat": now, "exp": now + 300, **extra}
