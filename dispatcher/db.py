"""PostgreSQL connections: a pool whose every wait is bounded, and a clear error when it is down."""

from __future__ import annotations

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dispatcher.errors import ServiceUnavailable
from dispatcher.settings import Settings

# A plain connection or one borrowed from a pool: both can open transactions.
Connection = asyncpg.Connection | PoolConnectionProxy

START_POSTGRES_HINT = (
    "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
)


async def create_pool(settings: Settings, *, min_size: int | None = None,
                      max_size: int | None = None) -> asyncpg.Pool:
    """Open a pool with bounded timeouts and TCP keepalives so a dead socket cannot wedge it."""
    try:
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=settings.db_pool_min if min_size is None else min_size,
            max_size=settings.db_pool_max if max_size is None else max_size,
            timeout=10,
            command_timeout=settings.db_command_timeout_seconds,
            server_settings={
                "application_name": "dispatcher",
                "tcp_keepalives_idle": "30",
                "tcp_keepalives_interval": "10",
                "tcp_keepalives_count": "3",
            },
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable ({type(exc).__name__}: {exc}); {START_POSTGRES_HINT}"
        ) from exc
    assert pool is not None
    return pool


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection with a bounded connect timeout and a clear error if PostgreSQL is down."""
    try:
        return await asyncpg.connect(dsn, timeout=10)
    except (OSError, TimeoutError) as exc:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable ({type(exc).__name__}: {exc}); {START_POSTGRES_HINT}"
        ) from exc
