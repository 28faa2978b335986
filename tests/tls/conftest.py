"""Certificates the suite makes for itself: a trusted CA (the stack's, for RabbitMQ) and, per
test module, private CAs and server certificates for Redis and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessiond import stack


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA nobody trusts, with a client certificate of its own."""
    tls = tmp_path_factory.mktemp("other-ca")
    stack.make_ca(tls)
    stack.make_cert(tls, "client", cn="intruder")
    return tls
