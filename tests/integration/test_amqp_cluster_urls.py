"""``billing_client.amqp``: a comma-separated list of AMQP addresses, the first that answers.

The node that answers is the shared broker; the others are closed ports (a dead node). The full
behaviour (a node killed under load, reconnects to another) is in ``tests/cluster``.
"""

from __future__ import annotations

import pytest

from billing_client.amqp import ClusterConnection, connect_robust, redacted, split_urls
from tests.faults.nodes import free_port

LIVE = "amqp://guest:guest@127.0.0.1:5672/"


def test_split_and_redact() -> None:
    assert split_urls(" amqp://a/ , amqp://b/,") == ["amqp://a/", "amqp://b/"]
    assert split_urls(["amqp://a/"]) == ["amqp://a/"]
    with pytest.raises(ValueError, match="no AMQP address"):
        split_urls(" , ")
    assert redacted("amqp://u:secret@h:5672/") == "amqp://u:******@h:5672/"


async def test_the_first_node_that_answers_is_used() -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    connection = await connect_robust(f"{dead},{LIVE}", timeout=10)
    try:
        assert isinstance(connection, ClusterConnection)
        assert connection.node == redacted(LIVE)
        channel = await connection.channel()
        await channel.close()
    finally:
        await connection.close()


async def test_no_node_answering_fails_fast() -> None:
    dead = [f"amqp://guest:guest@127.0.0.1:{free_port()}/" for _ in range(2)]
    with pytest.raises(ConnectionError):
        await connect_robust(",".join(dead), timeout=5)
