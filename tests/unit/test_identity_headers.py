"""The identity header encoding (CONTRACT §9): injective, header-safe, readable when plain."""

from __future__ import annotations

from urllib.parse import unquote

from hypothesis import example, given
from hypothesis import strategies as st

from api.decision import header_value

VISIBLE = {chr(c) for c in range(0x21, 0x7F)}


@given(st.text(st.characters(codec="utf-8"), max_size=200))
@example("café")
@example("caf%C3%A9")
@example(" lead and trail ")
@example("a\r\nX-User-Id: admin")
def test_decoding_gives_back_exactly_the_original(value: str) -> None:
    encoded = header_value(value)
    # Only visible ASCII reaches the header: no space to trim, no CR/LF, no byte to mangle
    assert set(encoded) <= VISIBLE
    # And decoding is the inverse, so two identities never share a header value
    assert unquote(encoded, errors="strict") == value


@given(st.text(max_size=50), st.text(max_size=50))
def test_different_identities_never_share_a_value(a: str, b: str) -> None:
    a, b = (s.encode("utf-8", "replace").decode() for s in (a, b))
    if a != b:
        assert header_value(a) != header_value(b)


def test_the_forms_the_docs_show() -> None:
    assert header_value("john@example.com") == "john@example.com"  # plain stays plain
    assert header_value("café") == "caf%C3%A9"
    assert header_value("caf%C3%A9") == "caf%25C3%25A9"  # "%" is always encoded
    assert header_value("a b") == "a%20b"
    assert header_value("") == ""
