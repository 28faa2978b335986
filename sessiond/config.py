"""The one typed settings object, read from ``SESSIOND_*`` environment variables.

Every process (API, workers, scheduler, CLI, tests) builds its behaviour from this object so that a
deployment is described by its environment alone (CONTRACT §3, §4).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "dev-only-insecure-secret-change-me"  # noqa: S105 - refused in production
MIN_HMAC_SECRET_BYTES = 32

IdleScope = Literal["session", "user"]


class Settings(BaseSettings):
    """Validated at start-up so that a bad deployment fails fast instead of at the first event."""

    model_config = SettingsConfigDict(env_prefix="SESSIOND_", extra="ignore", frozen=True)

    env: Literal["development", "test", "production"] = "development"
    log_level: str = "INFO"

    # Connections (CONTRACT §4). Defaults reach the local stack started by `sessiond stack up`.
    # One URL, or several comma-separated ones (the nodes of a cluster, tried in turn on every
    # connection: ``sessiond.amqp``).
    amqp_url: str = "amqp://sessiond:sessiond@127.0.0.1:5672/sessiond"
    # ``quorum`` on a RabbitMQ cluster (replicated queues); an existing classic queue cannot be
    # redeclared as quorum: docs/cluster.md says how to migrate.
    queue_type: Literal["classic", "quorum"] = "classic"
    amqp_ca_file: str | None = None
    amqp_cert_file: str | None = None
    amqp_key_file: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_ca_file: str | None = None
    # A Redis Cluster (CONTRACT §10): ``redis_url`` lists its startup nodes
    # (``storage.redis_conn``).
    redis_cluster: bool = False
    database_url: str = "postgres://sessiond:sessiond@127.0.0.1:5432/sessiond"
    db_pool_min: int = Field(default=1, ge=1)
    db_pool_max: int = Field(default=10, ge=1)

    # Events in (CONTRACT §1, §7).
    events_exchange: str = "auth.events"
    # Versioned: a single active consumer cannot be added to an existing queue; sessiond drains
    # the unversioned queue of older releases into these (``actors.topology``).
    ingest_queue: str = "sessiond.ingest.v2"
    dead_letter_queue: str = "sessiond.dead-letter"
    partitions: int = Field(default=8, ge=1, le=1024)
    max_event_bytes: int = 64 * 1024
    ingress: bool = True
    retry_max: int = Field(default=12, ge=0)
    retry_min_backoff_ms: int = Field(default=500, ge=1)
    retry_max_backoff_ms: int = Field(default=60_000, ge=1)
    retry_max_age_s: int = Field(default=3600, ge=1)
    # How long the de-duplication ledger remembers an event (``storage.retention``); 0 = forever.
    dedup_retention_s: int = Field(default=7 * 86_400, ge=0)
    # How long audit rows are kept, by class (``storage.retention``: whole daily partitions are
    # dropped); 0 = forever. Access: decisions, refused-token counts, overflow counts.
    audit_access_retention_days: int = Field(default=30, ge=0)
    audit_lifecycle_retention_days: int = Field(default=400, ge=0)
    audit_partitions_ahead_days: int = Field(default=7, ge=1, le=366)
    keycloak_exchange: str | None = None
    # Client events and (CONTRACT §8) admin events: revocations by a Keycloak administrator.
    keycloak_routing_keys: str = "KK.EVENT.CLIENT.#,KK.EVENT.ADMIN.#"
    keycloak_queue: str = "sessiond.keycloak.v2"
    # Keycloak client event types counted as activity of their session (comma-separated; only
    # ``REFRESH_TOKEN`` and ``CODE_TO_TOKEN`` are allowed). Empty: off.
    keycloak_activity_events: str = ""
    events_out_exchange: str = "sessiond.events"
    # Lifecycle events out (CONTRACT §7): the outbox relay in every worker process.
    outbox_relay: bool = True
    outbox_poll_s: float = Field(default=0.5, gt=0)
    outbox_batch_size: int = Field(default=500, ge=1, le=10_000)
    outbox_retention_s: int = Field(default=86_400, ge=0)
    # A worker's consumer that holds no message, was given none for this long and whose queue
    # has messages ready reconnects (``actors.consumer``, the stall watchdog); 0 = off.
    consumer_stall_s: float = Field(default=10.0, ge=0)

    # Timing (CONTRACT §3).
    idle_timeout_s: int = Field(default=1800, ge=1)
    # What the idle timeout measures (CONTRACT §8): each session on its own (``session``), or the
    # user as a whole, whose newest request keeps all of their sessions alive (``user``).
    idle_scope: IdleScope = "session"
    cache_ttl_s: int = Field(default=3600, ge=1)
    # The API's cache reconciler (``storage.reconcile``): period of its turns (0 = off; the API
    # still catches up before trusting a Redis that failed).
    cache_reconcile_s: float = Field(default=2.0, ge=0)
    activity_flush_s: float = Field(default=5.0, gt=0)
    expiry_period_s: float = Field(default=60.0, gt=0)
    expiry_batch_size: int = Field(default=5000, ge=1)
    session_max_s: int | None = None
    max_sessions_per_user: int | None = None

    # Tokens (CONTRACT §2).
    jwt_secret: str = PLACEHOLDER_SECRET
    jwt_algorithms: str = "HS256"
    jwks_url: str | None = None
    jwks_file: str | None = None
    jwt_leeway_s: int = Field(default=30, ge=0)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_max_bytes: int = Field(default=8192, ge=256)

    # Bounds of the access journal's buffers (``storage.activity``, ``api.recorder``): past a cap
    # entries are counted (``access_log_overflow``), not stored.
    access_log_max_entries: int = Field(default=1_000_000, ge=1)
    access_log_max_bytes: int = Field(default=256 * 2**20, ge=1024)
    access_refused_max_keys: int = Field(default=100_000, ge=1)
    api_buffer_max_entries: int = Field(default=200_000, ge=1)
    api_buffer_max_bytes: int = Field(default=64 * 2**20, ge=1024)
    access_log_page: int = Field(default=5_000, ge=1, le=100_000)
    # Start-up check of Redis ``maxmemory-policy`` (``storage.cache.check_memory_policy``).
    redis_policy_check: bool = True
    # OIDC Back-Channel Logout (CONTRACT §8): accepted ``aud`` values (comma-separated; unset =
    # the route is off, 404) and the issuer (default: ``SESSIOND_JWT_ISSUER``).
    backchannel_audience: str | None = None
    backchannel_issuer: str | None = None

    # API process.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(default=2, ge=1)
    # Where the API's Sanic workers share their metrics; unset: a fresh temporary directory per
    # start of the main process (set it to put that directory on a volume of your choice).
    metrics_dir: str | None = None
    # Envoy ext_authz over gRPC and grpc.health.v1 in every API process (CONTRACT §9); unset: off.
    grpc_port: int | None = Field(default=None, ge=1, le=65535)
    # RFC 7662 introspection callers, "id:secret,id2:secret2" (CONTRACT §9); unset: Basic is off.
    introspection_clients: str | None = None

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: str) -> str:
        schemes = {urlsplit(u.strip()).scheme for u in value.split(",") if u.strip()}
        if not schemes or not schemes <= {"amqp", "amqps"}:
            raise ValueError("SESSIOND_AMQP_URL must start with amqp:// or amqps://")
        if len(schemes) > 1:
            raise ValueError("SESSIOND_AMQP_URL: all node URLs amqp:// or all amqps://")
        return value

    @field_validator("database_url")
    @classmethod
    def _pg_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("postgres", "postgresql"):
            raise ValueError("SESSIOND_DATABASE_URL must start with postgres://")
        return value

    @field_validator("keycloak_activity_events")
    @classmethod
    def _activity_types(cls, value: str) -> str:
        allowed = {"REFRESH_TOKEN", "CODE_TO_TOKEN"}
        unknown = {t.strip() for t in value.split(",") if t.strip()} - allowed
        if unknown:
            raise ValueError(f"SESSIOND_KEYCLOAK_ACTIVITY_EVENTS: not one of {sorted(allowed)}")
        return value

    @model_validator(mode="after")
    def _no_weak_hmac_secret_outside_development(self) -> Settings:
        """Whoever knows an HMAC secret can mint any token, admin ones included: outside
        development, accepting any ``HS*`` algorithm needs a real secret of at least 32 bytes
        (RFC 7518 §3.2: at least the hash's size), whatever else is configured (a JWKS beside it
        does not make the placeholder any less public)."""
        if self.env == "development":
            return self
        hmac = [a for a in self.algorithms if a.upper().startswith("HS")]
        if not hmac:
            return self
        if self.jwt_secret == PLACEHOLDER_SECRET:
            raise ValueError(
                f"SESSIOND_JWT_SECRET is the public placeholder while SESSIOND_JWT_ALGORITHMS "
                f"accepts {','.join(hmac)} (SESSIOND_ENV={self.env}): set a secret of at least "
                f"{MIN_HMAC_SECRET_BYTES} bytes, or drop HS* from SESSIOND_JWT_ALGORITHMS"
            )
        if len(self.jwt_secret.encode("utf-8")) < MIN_HMAC_SECRET_BYTES:
            raise ValueError(
                f"SESSIOND_JWT_SECRET is shorter than {MIN_HMAC_SECRET_BYTES} bytes while "
                f"SESSIOND_JWT_ALGORITHMS accepts {','.join(hmac)} (SESSIOND_ENV={self.env})"
            )
        return self

    @property
    def amqp_urls(self) -> list[str]:
        """The broker's nodes, in the order connections try them."""
        return [u.strip() for u in self.amqp_url.split(",") if u.strip()]

    @property
    def amqp_is_tls(self) -> bool:
        return urlsplit(self.amqp_urls[0]).scheme == "amqps"

    @property
    def keycloak_activity_types(self) -> list[str]:
        return [t.strip() for t in self.keycloak_activity_events.split(",") if t.strip()]

    @property
    def backchannel_audiences(self) -> list[str]:
        return [a.strip() for a in (self.backchannel_audience or "").split(",") if a.strip()]

    @property
    def introspection_credentials(self) -> dict[str, str]:
        """``SESSIOND_INTROSPECTION_CLIENTS`` as ``{client_id: secret}``."""
        clients: dict[str, str] = {}
        for item in (self.introspection_clients or "").split(","):
            client_id, _, secret = item.strip().partition(":")
            if client_id:
                clients[client_id] = secret
        return clients

    @field_validator("introspection_clients")
    @classmethod
    def _clients_form(cls, value: str | None) -> str | None:
        for item in (value or "").split(","):
            client_id, sep, secret = item.strip().partition(":")
            if item.strip() and not (client_id and sep and secret):
                raise ValueError("SESSIOND_INTROSPECTION_CLIENTS must be comma-separated id:secret")
        return value

    @property
    def algorithms(self) -> list[str]:
        return [a.strip() for a in self.jwt_algorithms.split(",") if a.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests call ``get_settings.cache_clear()`` after changing the env."""
    return Settings()
