"""The aiohttp application: health, readiness, metrics and Twilio status callbacks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from dispatcher.db import ping
from dispatcher.errors import ServiceUnavailable
from dispatcher.metrics import Metrics
from dispatcher.twilio.callbacks import StatusCallbacks

MAX_BODY_BYTES = 1024 * 1024

APP_KEY_POOL = web.AppKey("pool", asyncpg.Pool)
APP_KEY_METRICS = web.AppKey("metrics", Metrics)


def build_app(pool: asyncpg.Pool, metrics: Metrics, callbacks: StatusCallbacks,
              amqp: AbstractRobustConnection | None,
              consumers_attached: Callable[[], int]) -> web.Application:
    """Routes shared by every dispatcher process."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[APP_KEY_POOL] = pool
    app[APP_KEY_METRICS] = metrics

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = {
            "database": await _database_ok(pool),
            "broker": broker_connected(amqp),
            "consumers": consumers_attached() > 0,
        }
        status = 200 if all(checks.values()) else 503
        return web.json_response({"ready": status == 200, "checks": checks}, status=status)

    async def metrics_handler(_: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/twilio/status/{job_id}", callbacks.handle)
    return app


def broker_connected(amqp: AbstractRobustConnection | None) -> bool:
    """True while the connection is up: a robust connection reconnecting is not closed, but
    not connected either (its ``connected`` event is cleared while the broker is away)."""
    if amqp is None or amqp.is_closed:
        return False
    return amqp.connected.is_set()


async def _database_ok(pool: asyncpg.Pool) -> bool:
    try:
        await ping(pool)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError,
            asyncpg.TargetServerAttributeNotMatched, ServiceUnavailable):
        return False  # ServiceUnavailable: a read-only server (a standby) answered
    return True


Starter = Callable[[], Awaitable[None]]
