"""HTTP Basic callers of ``/oauth2/introspect``: RFC 6749 §2.3.1 form-urlencoding, exact match."""

from __future__ import annotations

import base64
from urllib.parse import quote_plus

from hypothesis import given
from hypothesis import strategies as st

from api.routes.introspect import basic_client
from sessiond.config import Settings

ids = st.text(st.characters(codec="utf-8", exclude_characters=":,"), min_size=1, max_size=30)
secrets = st.text(st.characters(codec="utf-8", exclude_characters=","), min_size=1, max_size=30)


def header(client_id: str, secret: str) -> str:
    return base64.b64encode(f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()).decode()


@given(ids, secrets, st.text(max_size=5))
def test_only_the_exact_pair_passes(client_id: str, secret: str, extra: str) -> None:
    clients = {client_id: secret, "other": "other-secret"}
    assert basic_client(header(client_id, secret), clients)
    if extra:
        assert not basic_client(header(client_id, secret + extra), clients)
        assert not basic_client(header(client_id + extra, secret), clients)
    assert not basic_client(header(client_id, "other-secret"), clients) or secret == "other-secret"


@given(ids.filter(lambda s: s.strip() == s), secrets.filter(lambda s: s.strip() == s))
def test_the_setting_reads_what_basic_checks(client_id: str, secret: str) -> None:
    settings = Settings(introspection_clients=f"{client_id}:{secret}, gw:x")
    assert basic_client(header(client_id, secret), settings.introspection_credentials)


def test_garbage_never_passes() -> None:
    clients = {"gw": "s3cret"}
    for value in [
        "",
        "!!!",
        base64.b64encode(b"gw").decode(),
        base64.b64encode(b"\xff:x").decode(),
    ]:
        assert not basic_client(value, clients)
    assert not basic_client(header("gw", "s3cret"), {})
