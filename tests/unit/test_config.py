"""Settings come from the environment only, and a bad deployment fails at start-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sessiond.config import PLACEHOLDER_SECRET, Settings


def test_defaults_match_the_contract() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.idle_timeout_s, s.cache_ttl_s, s.activity_flush_s, s.expiry_period_s) == (
        1800,
        3600,
        5.0,
        60.0,
    )
    assert s.events_exchange == "auth.events"
    assert s.partitions == 8
    assert s.jwt_leeway_s == 30


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIOND_IDLE_TIMEOUT_S", "60")
    monkeypatch.setenv("SESSIOND_JWT_ALGORITHMS", "RS256, ES256")
    s = Settings()
    assert s.idle_timeout_s == 60
    assert s.algorithms == ["RS256", "ES256"]


def test_placeholder_secret_refused_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIOND_ENV", "production")
    monkeypatch.delenv("SESSIOND_JWT_SECRET", raising=False)
    with pytest.raises(ValidationError, match="SESSIOND_JWT_SECRET"):
        Settings(jwt_secret=PLACEHOLDER_SECRET)
    assert Settings(jwt_secret="a-real-secret-from-the-vault-32-bytes").env == "production"


@pytest.mark.parametrize("env", ["test", "production"])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        # Scenario 7 of issue 11: a JWKS beside HS256 does not make the placeholder private.
        {"jwks_url": "https://sso.example.com/certs", "jwt_algorithms": "HS256,RS256"},
        {"jwks_file": "/etc/jwks.json", "jwt_algorithms": "RS256, hs512"},
    ],
)
def test_placeholder_or_short_hmac_secret_refused_outside_development(
    monkeypatch: pytest.MonkeyPatch, env: str, extra: dict[str, str]
) -> None:
    # Given a non-development environment that accepts an HS* algorithm
    monkeypatch.setenv("SESSIOND_ENV", env)
    # Then the placeholder and any secret under 32 bytes are refused at start-up
    with pytest.raises(ValidationError, match="placeholder"):
        Settings.model_validate({"jwt_secret": PLACEHOLDER_SECRET, **extra})
    with pytest.raises(ValidationError, match="shorter than 32 bytes"):
        Settings.model_validate({"jwt_secret": "x" * 31, **extra})
    # 31 ASCII characters but 33 bytes of UTF-8 is long enough: the rule counts bytes
    assert Settings.model_validate({"jwt_secret": "é" * 2 + "x" * 29, **extra}).env == env
    assert Settings.model_validate({"jwt_secret": "x" * 32, **extra}).env == env


def test_placeholder_is_harmless_without_hmac_and_allowed_in_development(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SESSIOND_ENV", "production")
    s = Settings(jwt_secret=PLACEHOLDER_SECRET, jwt_algorithms="RS256,ES256", jwks_url="https://x")
    assert s.algorithms == ["RS256", "ES256"]
    monkeypatch.setenv("SESSIOND_ENV", "development")
    assert Settings(jwt_secret="short").jwt_secret == "short"


@pytest.mark.parametrize(
    ("field", "value"),
    [("amqp_url", "http://x"), ("database_url", "mysql://x"), ("partitions", 0)],
)
def test_bad_values_fail_fast(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate({field: value})


def test_tls_detected_from_scheme() -> None:
    assert Settings(amqp_url="amqps://u:p@host:5671/v").amqp_is_tls
    assert not Settings(amqp_url="amqp://u:p@host/v").amqp_is_tls
