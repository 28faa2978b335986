"""A multi-host SESSIOND_DATABASE_URL (CONTRACT §10): what Tortoise and asyncpg are given."""

from __future__ import annotations

from sessiond.config import Settings
from storage import db

MULTI = "postgres://u:p%40ss@10.0.0.1:5432,10.0.0.2:5433/app?target_session_attrs=read-write"


def test_every_host_reaches_asyncpg_with_the_session_attribute() -> None:
    conn = db.tortoise_config(Settings(database_url=MULTI))["connections"]["default"]
    assert conn["engine"] == "storage.pg_engine"
    creds = conn["credentials"]
    assert creds["hosts"] == ["10.0.0.1", "10.0.0.2"] and creds["ports"] == [5432, 5433]
    assert creds["target_session_attrs"] == "read-write"
    assert (creds["user"], creds["password"], creds["database"]) == ("u", "p@ss", "app")


def test_host_lists_follow_libpq() -> None:
    assert db.hosts("u:p@a,b:6000") == (["a", "b"], [5432, 6000])
    assert db.hosts("[::1]:7000,[fe80::1]") == (["::1", "fe80::1"], [7000, 5432])


def test_one_host_keeps_the_plain_url() -> None:
    url = "postgres://u:p@127.0.0.1:5432/app"
    conn = db.tortoise_config(Settings(database_url=url))["connections"]["default"]
    assert isinstance(conn, str) and conn.startswith(url)
