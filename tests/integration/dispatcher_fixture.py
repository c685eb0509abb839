"""The ``dispatcher`` fixture: a real dispatcher service in-process, wired to the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
import pytest_asyncio

from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.events.publisher import JobPublisher
from dispatcher.events.topology import Names, delete_all
from dispatcher.jobs.contract import SmsJob
from dispatcher.service import Service
from dispatcher.settings import Settings
from tests.integration.sandbox_fixture import SandboxHandle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningDispatcher:
    """A started service, a publisher onto its jobs exchange, and the sandbox behind it."""

    settings: Settings
    service: Service
    publisher: JobPublisher
    sandbox: SandboxHandle
    pool: asyncpg.Pool
    stop: asyncio.Event

    async def funded_account(self, account: str, credits: int, **auto: Any) -> str:
        await create_account(self.pool, account, auto_recharge=(
            auto.get("enabled", False), auto.get("threshold", 0), auto.get("amount", 0)))
        if credits:
            await CreditStore(self.pool).grant(account, credits, "purchase", f"{account}-seed")
        return account

    async def publish_sms(self, job_id: str, account: str, to: str = "+14155550100",
                          body: str = "hello", **extra: Any) -> None:
        await self.publisher.publish({"schema_version": 1, "id": job_id, "kind": "sms",
                                      "account": account, "to": to, "from": "+14155550199",
                                      "body": body, **extra})

    async def job(self, job_id: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
        return None if row is None else dict(row)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 20.0,
                   interval: float = 0.05) -> None:
    """Wait until ``check`` is true; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {check.__qualname__}")


def dispatcher_settings(settings: Settings, sandbox: SandboxHandle, **overrides: Any) -> Settings:
    port = free_port()
    values: dict[str, Any] = {
        "http_port": port, "public_base_url": f"http://127.0.0.1:{port}",
        "twilio_base_url": sandbox.base_url, "twilio_account_sid": sandbox.account_sid,
        "twilio_auth_token": sandbox.auth_token, "twilio_timeout_seconds": 2.0,
        "reconcile_grace_seconds": 3.0, "reconcile_interval_seconds": 0.5,
        "hold_sweep_interval_seconds": 0.5, "shutdown_timeout_seconds": 5.0, "prefetch": 50,
        "max_in_flight": 20, "sender_rate_per_second": 10_000}
    return replace(settings, **{**values, **overrides})


@contextlib.asynccontextmanager
async def running_dispatcher(settings: Settings, sandbox: SandboxHandle, pool: asyncpg.Pool,
                             clock: Callable[[], datetime] | None = None,
                             **overrides: Any) -> AsyncIterator[RunningDispatcher]:
    """A dispatcher service started on ``dispatcher_settings(..., **overrides)``, then closed;
    ``clock``: its time for scheduled sends and quiet hours."""
    s = dispatcher_settings(settings, sandbox, **overrides)
    stop = asyncio.Event()
    service = Service(s) if clock is None else Service(s, clock=clock)
    await service.start(stop)
    publisher = await JobPublisher.connect(s.amqp_url, Names(s.amqp_prefix).jobs_exchange)
    try:
        yield RunningDispatcher(s, service, publisher, sandbox, pool, stop)
    finally:
        stop.set()
        await publisher.close()
        await service.close()
        await drop_topology(s)


@pytest_asyncio.fixture
async def dispatcher(settings: Settings, twilio_sandbox: SandboxHandle,
                     pool: asyncpg.Pool) -> AsyncIterator[RunningDispatcher]:
    async with running_dispatcher(settings, twilio_sandbox, pool) as d:
        yield d


async def drop_topology(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await delete_all(channel, Names(settings.amqp_prefix))
        await channel.queue_delete(f"{settings.amqp_prefix}.credits")


__all__ = ["RunningDispatcher", "SmsJob", "dispatcher", "running_dispatcher", "wait_for"]
