"""Cluster fixtures: one 3-node RabbitMQ cluster for the whole run, a fresh primary + standby
per test (a failover leaves only the standby), and the Twilio sandbox."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.nodes import RabbitCluster, ReplicatedPostgres
from tests.integration.conftest import _warm_resolver  # noqa: F401
from tests.integration.sandbox_fixture import twilio_sandbox  # noqa: F401


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three private RabbitMQ nodes, clustered (~25-60 s), shared by every cluster test."""
    with RabbitCluster(3) as cluster:
        yield cluster


@pytest.fixture
def replicated_postgres() -> Iterator[ReplicatedPostgres]:
    """A private primary with a synchronous standby, deleted afterwards."""
    with ReplicatedPostgres() as pg:
        yield pg
