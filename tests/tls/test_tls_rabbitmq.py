"""AMQP over TLS against the stack's real RabbitMQ TLS listener (``verify_peer``, client
certificates optional): the broker is verified against the configured CA and by host name, a
client certificate is presented when configured, and plain AMQP to a remote host warns."""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import pika
import pytest

from sessiond import amqp, stack
from sessiond.config import Settings

pytestmark = pytest.mark.integration


def tls_settings(cfg: stack.StackConfig, settings: Settings, **tls: str) -> Settings:
    vhost = settings.amqp_url.rsplit("/", 1)[1]
    url = f"amqps://{stack.USER}:{stack.PASSWORD}@localhost:{cfg.amqps_port}/{vhost}"
    return Settings(**{**settings.model_dump(), "amqp_url": url, **tls})


def open_channel(settings: Settings) -> None:
    params = amqp.parameter_kwargs(settings)
    params["connection_attempts"] = 1
    conn = pika.BlockingConnection(pika.ConnectionParameters(**params))
    try:
        conn.channel().queue_declare("", exclusive=True)
    finally:
        conn.close()


def refusal(settings: Settings) -> str:
    """pika raises the TLS error itself (an ``OSError``, which the ingress logs and retries)."""
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)) as info:
        open_channel(settings)
    return str(info.value)


def test_verified_against_the_ca(stack_config: stack.StackConfig, settings: Settings) -> None:
    s = tls_settings(stack_config, settings, amqp_ca_file=str(stack_config.ca_file))
    assert s.amqp_is_tls
    open_channel(s)


def test_unknown_ca_is_refused_with_a_clear_error(
    stack_config: stack.StackConfig, settings: Settings, other_ca: Path
) -> None:
    s = tls_settings(stack_config, settings, amqp_ca_file=str(other_ca / "ca.pem"))
    assert "certificate verify failed" in refusal(s)


def test_wrong_host_name_is_refused(stack_config: stack.StackConfig, settings: Settings) -> None:
    # The context our workers use, on the real listener, expecting a name the certificate does
    # not carry (pika passes the URL's host as server_hostname: see parameter_kwargs)
    s = tls_settings(stack_config, settings, amqp_ca_file=str(stack_config.ca_file))
    assert amqp.parameter_kwargs(s)["ssl_options"].server_hostname == "localhost"
    ctx = amqp.tls_context(s)
    with (
        socket.create_connection(("127.0.0.1", stack_config.amqps_port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        ctx.wrap_socket(raw, server_hostname="broker.example.com")


def test_client_certificate_presented_and_verified(
    stack_config: stack.StackConfig, settings: Settings, other_ca: Path
) -> None:
    tls = stack_config.tls_dir
    # A client certificate from the broker's CA is accepted
    good = tls_settings(
        stack_config, settings, amqp_ca_file=str(tls / "ca.pem"),
        amqp_cert_file=str(tls / "client.pem"), amqp_key_file=str(tls / "client.key"),
    )  # fmt: skip
    open_channel(good)
    # One from an unknown CA is refused by the broker (verify_peer)
    bad = tls_settings(
        stack_config, settings, amqp_ca_file=str(tls / "ca.pem"),
        amqp_cert_file=str(other_ca / "client.pem"), amqp_key_file=str(other_ca / "client.key"),
    )  # fmt: skip
    refusal(bad)


@pytest.mark.parametrize(
    ("url", "warns"),
    [
        ("amqp://u:p@rabbit.example.com:5672/v", True),
        ("amqp://u:p@10.0.0.7:5672/v", True),
        ("amqp://u:p@127.0.0.1:5672/v", False),
        ("amqp://u:p@localhost:5672/v", False),
        ("amqp://u:p@[::1]:5672/v", False),
        ("amqps://u:p@rabbit.example.com:5671/v", False),
    ],
)
def test_plaintext_to_a_remote_host_warns(
    url: str, warns: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sessiond.amqp"):
        amqp.warn_if_plaintext(Settings(amqp_url=url))
    warned = [r for r in caplog.records if "without TLS" in r.getMessage()]
    assert bool(warned) is warns
