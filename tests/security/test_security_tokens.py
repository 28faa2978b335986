"""Property tests of token parsing (``api.tokens``): any ``Authorization`` value is either a
``Principal`` with a usable user id or a ``TokenError`` with a documented reason, never anything
else, whatever the header, claims or signature hold."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm

from api.tokens import MAX_SUBJECT, REASONS, Principal, TokenError, TokenValidator
from sessiond.config import Settings
from tests.security._jwt import SECRET, b64, claims, hs256, raw

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["HS256", "RS256", "none", "None", "HS512", "ES256", ""])
        | json_values,
        "kid": st.sampled_from(["k1", "../../../dev/null", "' OR '1'='1", "k1\x00"]) | json_values,
        "typ": json_values,
        "crit": json_values,
        "cty": json_values,
        "jwk": json_values,
    },
)
payloads = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.text(max_size=140) | json_values,
        "user_id": json_values,
        "sid": st.text(max_size=20) | json_values,
        "roles": json_values,
        "exp": st.integers(min_value=-(2**40), max_value=2**40)
        | st.floats(allow_nan=True, allow_infinity=True)
        | json_values,
        "nbf": json_values,
        "iat": json_values,
        "aud": json_values,
        "iss": json_values,
    },
)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def validators(tmp_path_factory: pytest.TempPathFactory) -> list[TokenValidator]:
    """HS256 only, and HS256 + RS256 with a JWKS file (so ``kid`` look-ups happen too)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return [
        TokenValidator(Settings(jwt_secret=SECRET)),
        TokenValidator(
            Settings(
                jwt_secret=SECRET,
                jwt_algorithms="HS256,RS256",
                jwks_file=str(Path(jwks)),
                jwt_issuer="https://issuer.example",
                jwt_audience="sessiond",
            )
        ),
    ]


def check(loop: asyncio.AbstractEventLoop, validators: list[TokenValidator], header: str) -> None:
    for validator in validators:
        validator._cache.clear()
        try:
            principal = loop.run_until_complete(validator.validate(header))
        except TokenError as exc:
            assert exc.reason in REASONS, exc.reason
            continue
        assert isinstance(principal, Principal)
        assert 0 < len(principal.user_id) <= MAX_SUBJECT
        assert "\x00" not in principal.user_id
        principal.user_id.encode("utf-8")  # a Redis key and a PostgreSQL text value
        if principal.session_id is not None:
            principal.session_id.encode("utf-8")


@SETTINGS
@given(st.text(st.characters(exclude_categories=()), max_size=400))
@example("\udcff\udcfe")  # bytes that are not UTF-8, as the server decodes them
def test_any_header_value(
    loop: asyncio.AbstractEventLoop, validators: list[TokenValidator], value: str
) -> None:
    check(loop, validators, value)
    check(loop, validators, "Bearer " + value)


@SETTINGS
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=5))
def test_any_segments(
    loop: asyncio.AbstractEventLoop, validators: list[TokenValidator], parts: list[bytes]
) -> None:
    check(loop, validators, "Bearer " + ".".join(b64(p) for p in parts))


@SETTINGS
@given(headers, payloads, st.booleans())
@example({"alg": "HS256"}, {"sub": "\ud800", "exp": 2**40}, True)
@example({"alg": "HS256"}, {"sub": "a\x00", "exp": 2**40}, True)
@example({"alg": "HS256"}, {"sub": "a", "sid": "\udfff", "exp": 2**40}, True)
@example({"alg": "HS256"}, {"sub": "a", "exp": float("inf")}, True)
@example({"alg": "HS256"}, {"sub": "a", "exp": float("nan")}, True)
def test_any_header_and_claims_even_when_signed(
    loop: asyncio.AbstractEventLoop,
    validators: list[TokenValidator],
    header: dict[str, Any],
    payload: dict[str, Any],
    signed: bool,
) -> None:
    # Signed with the real secret: what a careless issuer could produce must not crash us either.
    token = hs256(header, payload) if signed else raw(header, payload, b"sig")
    check(loop, validators, "Bearer " + token)


def test_a_valid_token_still_passes(
    loop: asyncio.AbstractEventLoop, validators: list[TokenValidator]
) -> None:
    token = hs256({"alg": "HS256", "typ": "JWT"}, claims())
    principal = loop.run_until_complete(validators[0].validate("Bearer " + token))
    assert principal.user_id == "victim"
