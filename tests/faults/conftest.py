"""Fault-test fixtures: the Twilio sandbox, and private nodes a test may crash (see nodes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.nodes import PrivatePostgres, PrivateRabbitMQ
from tests.integration.conftest import _warm_resolver  # noqa: F401
from tests.integration.sandbox_fixture import twilio_sandbox  # noqa: F401


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started PostgreSQL cluster of this test's own, deleted afterwards."""
    with PrivatePostgres() as pg:
        yield pg


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """A started RabbitMQ node of this test's own (slow to boot: ~10-60 s), deleted afterwards."""
    with PrivateRabbitMQ() as mq:
        yield mq
