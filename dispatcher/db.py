"""PostgreSQL connections: a pool whose every wait is bounded, and a clear error when it is down.

Pooled connections are returned without asyncpg's reset query (``UNLISTEN *``, ``RESET ALL``,
advisory unlock: one more round trip per release). That is safe because nothing leaves session
state on a pooled connection: LISTEN runs on connections of its own (``listening``), nothing
sets session settings, and a session advisory lock is always unlocked, or its connection
terminated, before release. asyncpg still rolls back a transaction left open.

A primary with a standby that takes over: ``DISPATCHER_DATABASE_URL`` may list every host,
``postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write`` (added when a multi-host
URL has none): each new connection goes to the host that accepts writes. After a failover the
old primary's connections die, the pool and the LISTEN connections reconnect to the new one
(``database_server_changed`` in the log), and a connection found read-only (a standby, or a
fenced old primary) is dropped by ``ping`` rather than used again.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from dispatcher.errors import DatabaseMissing, DatabaseNotMigrated, ServiceUnavailable
from dispatcher.migrate import available_migrations
from dispatcher.queries import q
from dispatcher.settings import Settings

# A plain connection or one borrowed from a pool: both can open transactions.
Connection = asyncpg.Connection | PoolConnectionProxy

START_POSTGRES_HINT = (
    "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
)


log = structlog.get_logger(__name__)

# A connection of its own listening on channel X shows as application_name "dispatcher listen X".
LISTEN_APPLICATION_PREFIX = "dispatcher listen "

CLOSE_TIMEOUT_SECONDS = 5.0

Connect = Callable[[], Awaitable[asyncpg.Connection]]
Notified = Callable[[object, int, str, object], None]


async def _no_reset(_connection: asyncpg.Connection) -> None:
    """Pooled connections carry no session state (see the module docstring)."""


def primary_dsn(dsn: str) -> str:
    """``dsn``, with ``target_session_attrs=read-write`` if it lists several hosts and says
    nothing of which (asyncpg's default, ``any``, could pick a standby)."""
    url = urlsplit(dsn)
    if "," not in url.netloc or "target_session_attrs" in parse_qs(url.query):
        return dsn
    if os.environ.get("PGTARGETSESSIONATTRS"):
        return dsn
    return f"{dsn}{'&' if url.query else '?'}target_session_attrs=read-write"


class ServerTracker:
    """Logs ``database_server_changed`` when a new connection lands on another server than
    the one before (a failover seen from this process); no round trip."""

    def __init__(self) -> None:
        self.server: str | None = None

    async def __call__(self, conn: asyncpg.Connection) -> None:
        addr = getattr(conn, "_addr", None)
        server = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        if self.server is not None and server != self.server:
            log.warning("database_server_changed", previous=self.server, server=server)
        self.server = server


NO_PRIMARY = ("PostgreSQL: none of the hosts of DISPATCHER_DATABASE_URL accepts writes (a "
              "failover in progress?)")


async def create_pool(settings: Settings, *, min_size: int | None = None,
                      max_size: int | None = None) -> asyncpg.Pool:
    """Open a pool with bounded timeouts and TCP keepalives so a dead socket cannot wedge it."""
    try:
        pool = await asyncpg.create_pool(
            primary_dsn(settings.database_url),
            init=ServerTracker(),
            min_size=settings.db_pool_min if min_size is None else min_size,
            max_size=settings.db_pool_max if max_size is None else max_size,
            timeout=10,
            command_timeout=settings.db_command_timeout_seconds,
            reset=_no_reset,
            server_settings={
                "application_name": "dispatcher",
                "tcp_keepalives_idle": "30",
                "tcp_keepalives_interval": "10",
                "tcp_keepalives_count": "3",
            },
        )
    except asyncpg.InvalidCatalogNameError as exc:
        raise database_missing(settings.database_url) from exc
    except asyncpg.TargetServerAttributeNotMatched as exc:
        raise ServiceUnavailable(NO_PRIMARY) from exc
    except asyncpg.PostgresError as exc:
        raise refused(exc) from exc
    except (OSError, TimeoutError) as exc:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable ({type(exc).__name__}: {exc}); {START_POSTGRES_HINT}"
        ) from exc
    assert pool is not None
    return pool


PING_TIMEOUT_SECONDS = 2.0


async def ping(pool: asyncpg.Pool) -> None:
    """One round trip through the pool; raises if PostgreSQL does not answer in time, or
    answers read-only (a standby, a demoted primary): then every pooled connection is expired,
    so the next ones are opened afresh, on the host that accepts writes."""
    writable = await pool.fetchval(q("ping"), timeout=PING_TIMEOUT_SECONDS)
    if writable is False:
        await pool.expire_connections()
        log.warning("database_read_only", action="pool connections expired")
        raise ServiceUnavailable("PostgreSQL answered read-only (a standby?): reconnecting; "
                                 "list every host with target_session_attrs=read-write")


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection with a bounded connect timeout and a clear error if PostgreSQL is down."""
    try:
        return await asyncpg.connect(primary_dsn(dsn), timeout=10)
    except asyncpg.InvalidCatalogNameError as exc:
        raise database_missing(dsn) from exc
    except asyncpg.TargetServerAttributeNotMatched as exc:
        raise ServiceUnavailable(NO_PRIMARY) from exc
    except asyncpg.PostgresError as exc:
        raise refused(exc) from exc
    except (OSError, TimeoutError) as exc:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable ({type(exc).__name__}: {exc}); {START_POSTGRES_HINT}"
        ) from exc


def refused(exc: asyncpg.PostgresError) -> ServiceUnavailable:
    """PostgreSQL answered but refused us (a role, a password, too many connections)."""
    return ServiceUnavailable(f"PostgreSQL refused the connection ({exc}) — check "
                              "DISPATCHER_DATABASE_URL")


def database_missing(dsn: str) -> DatabaseMissing:
    """The error for a database that does not exist, with the command that creates it."""
    url = urlsplit(re.sub(r",[^/?]*", "", dsn, count=1))  # several hosts: name the first
    name = unquote(url.path.lstrip("/")) or unquote(url.username or "postgres")
    port = f" -p {url.port}" if url.port not in (None, 5432) else ""
    create = f"createdb -h {url.hostname or '127.0.0.1'}{port} -U {url.username or 'postgres'}"
    return DatabaseMissing(f"database {name} does not exist — create it with `{create} {name}`"
                           ", then run `dispatcher migrate`")


async def require_migrated(conn: Connection | asyncpg.Pool) -> None:
    """Refuse to work on a database that lacks migrations, saying how to apply them."""
    try:
        applied = {row["name"] for row in await conn.fetch(q("applied_migrations"))}
    except asyncpg.UndefinedTableError:
        applied = set()
    pending = [name for name, _ in available_migrations() if name not in applied]
    if pending:
        raise DatabaseNotMigrated(
            f"the database is not migrated ({len(pending)} migration(s) pending, first "
            f"{pending[0]}) — run `dispatcher migrate` (or `dispatcher run --migrate`)")


@contextlib.asynccontextmanager
async def listening(pool: asyncpg.Pool, connect: Connect | None, channel: str,
                    callback: Notified) -> AsyncIterator[Connection]:
    """LISTEN on ``channel`` while the block runs, on a connection of its own from ``connect``.

    Yields the listening connection (``listener.keep_listening`` watches it). Without
    ``connect`` a pool connection is borrowed for the whole block; it is UNLISTENed before it
    goes back, or terminated if that fails, so it never returns still listening.
    """
    if connect is None:
        borrowed = await pool.acquire()
        try:
            async with _listener(borrowed, channel, callback):
                yield borrowed
        finally:
            await pool.release(borrowed)
        return
    own = await connect()
    try:
        await own.execute(q("name_listen_session"), f"{LISTEN_APPLICATION_PREFIX}{channel}")
        async with _listener(own, channel, callback):
            yield own
    finally:
        if not own.is_closed():
            await own.close(timeout=CLOSE_TIMEOUT_SECONDS)


@contextlib.asynccontextmanager
async def _listener(conn: Connection, channel: str, callback: Notified) -> AsyncIterator[None]:
    try:
        await conn.add_listener(channel, callback)
    except BaseException:
        conn.terminate()  # it may be listening already: never hand it back like that
        raise
    try:
        yield
    finally:
        try:
            await conn.remove_listener(channel, callback)
        except BaseException:
            conn.terminate()
            raise
