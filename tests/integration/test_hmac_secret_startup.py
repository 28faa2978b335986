"""No placeholder or weak HMAC secret outside development (issue 11, scenario 7), with the real
``sessiond api`` command: production, a JWKS configured, ``HS256,RS256`` accepted and no secret
set used to start, and then a token signed with the public placeholder and ``roles: [admin]``
got 200 on ``GET /admin/users``. Now it refuses to start; with a real secret it starts and that
token is 401."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from loadtests.harness import free_port
from sessiond.config import PLACEHOLDER_SECRET
from tests.api.conftest import http, mint
from tests.conftest import Process, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return path


def production(jwks: Path, secret: str) -> dict[str, str]:
    return {
        "SESSIOND_ENV": "production",
        "SESSIOND_JWKS_FILE": str(jwks),
        "SESSIOND_JWT_ALGORITHMS": "HS256,RS256",
        "SESSIOND_JWT_SECRET": secret,
    }


@pytest.mark.parametrize(
    ("secret", "why"),
    [(PLACEHOLDER_SECRET, "placeholder"), ("short-but-not-placeholder", "shorter than 32 bytes")],
)
def test_api_and_worker_refuse_to_start_with_a_weak_hmac_secret(
    spawn: Callable[..., Process], jwks_file: Path, secret: str, why: str
) -> None:
    port = free_port()
    env = production(jwks_file, secret)
    for proc in (
        spawn("api", "--port", str(port), "--workers", "1", env=env),
        spawn("worker", "--processes", "1", "--threads", "1", env=env),
    ):
        wait_until(lambda proc=proc: not proc.alive(), timeout=60)  # type: ignore[misc]
        assert proc.stop() != 0
        assert why in proc.output() and "SESSIOND_JWT_SECRET" in proc.output()
    with pytest.raises(OSError):
        http(f"http://127.0.0.1:{port}/health/live", timeout=2)


def test_with_a_real_secret_the_placeholder_token_is_refused(
    spawn: Callable[..., Process], jwks_file: Path, migrated: object
) -> None:
    port = free_port()
    api = spawn(
        "api",
        "--port",
        str(port),
        "--workers",
        "1",
        env=production(jwks_file, "a-real-secret-from-the-vault-with-32+-bytes"),
    )

    def up() -> bool:
        assert api.alive(), api.output()[-3000:]
        try:
            return http(f"http://127.0.0.1:{port}/health/live", timeout=2).status == 200
        except OSError:
            return False

    wait_until(up, timeout=90, interval=0.5)
    forged = mint("attacker", roles=["admin"], key=PLACEHOLDER_SECRET)
    reply = http(f"http://127.0.0.1:{port}/admin/users", token=forged)
    assert reply.status == 401
    assert reply.json() == {"error": "invalid_token", "reason": "bad_signature"}
