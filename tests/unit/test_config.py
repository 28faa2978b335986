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
    assert Settings(jwt_secret="a-real-secret-from-the-vault").env == "production"


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
