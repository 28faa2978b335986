"""Several AMQP node URLs and the queue type (CONTRACT §10): what every connection is given."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sessiond import amqp
from sessiond.config import Settings

NODES = "amqp://u:p@10.0.0.1:5672/v, amqp://u:p@10.0.0.2:5673/v,amqp://u:p@10.0.0.3/v"


def test_every_node_is_tried_in_the_configured_order() -> None:
    params = amqp.parameter_list(Settings(amqp_url=NODES))
    assert [(p["host"], p["port"]) for p in params] == [
        ("10.0.0.1", 5672),
        ("10.0.0.2", 5673),
        ("10.0.0.3", 5672),
    ]
    # a dead node costs one refused connect per pass; the last one carries the passes
    assert [p["connection_attempts"] for p in params] == [1, 1, 3]
    assert all(p["virtual_host"] == "v" for p in params)
    assert len(amqp.connection_parameters(Settings(amqp_url=NODES))) == 3


def test_one_url_stays_one_node() -> None:
    params = amqp.parameter_list(Settings(amqp_url="amqp://u:p@127.0.0.1:5672/v"))
    assert len(params) == 1 and params[0]["connection_attempts"] == 3


@pytest.mark.parametrize("url", ["amqp://a/v,amqps://b/v", "amqp://a/v,http://b/v", " , "])
def test_node_urls_share_one_scheme(url: str) -> None:
    with pytest.raises(ValidationError):
        Settings(amqp_url=url)


def test_quorum_adds_the_queue_type_to_every_declaration() -> None:
    quorum = Settings(queue_type="quorum")
    assert amqp.queue_arguments(quorum, amqp.INGEST_QUEUE_ARGUMENTS) == {
        "x-single-active-consumer": True,
        "x-queue-type": "quorum",
    }
    assert amqp.queue_arguments(Settings(), {"a": 1}) == {"a": 1}  # classic: unchanged
    assert amqp.INGEST_QUEUE_ARGUMENTS == {"x-single-active-consumer": True}
    with pytest.raises(ValidationError):
        Settings(queue_type="stream")  # type: ignore[arg-type]


def test_a_type_clash_says_how_to_migrate() -> None:
    clash = RuntimeError(
        "(406, \"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost "
        "'v': received the value 'quorum' of type 'longstr' but current is none\")"
    )
    err = amqp.explain_mismatch("q", Settings(queue_type="quorum"), clash)
    assert isinstance(err, amqp.QueueTypeMismatch)
    assert "docs/cluster.md" in str(err) and "'q'" in str(err)
    other = RuntimeError("(406, 'PRECONDITION_FAILED - x-max-length')")
    assert amqp.explain_mismatch("q", Settings(), other) is other
