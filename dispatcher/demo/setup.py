"""What the demo prepares before anything runs: its database, recipients and child settings."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import structlog

from billing_client.reference.settings import BillingSettings
from dispatcher.db import connect
from dispatcher.errors import DispatcherError
from dispatcher.events.topology import Names, delete_all
from dispatcher.migrate import migrate
from dispatcher.settings import Settings

log = structlog.get_logger(__name__)

# The demo drops and recreates its database: only names that say they are a demo's.
_DATABASE_NAME = re.compile(r"[a-z0-9_]*demo[a-z0-9_]*")
# Fictional-looking but valid mobile ranges, so the pre-flight prices every country.
_COUNTRY_NUMBERS = (("+1415555", 4), ("+1415555", 4), ("+1415555", 4), ("+1415555", 4),
                    ("+1415555", 4), ("+1415555", 4), ("+3361234", 4), ("+3361234", 4),
                    ("+49151234", 5), ("+3461234", 4))
DEMO_SENDER = "+14155550199"
DEMO_BODY = "Hi {name}, your demo order {order} ships today."
OPTED_OUT_NUMBER = "+14155559998"


class DemoFailed(DispatcherError):
    """The demo could not complete."""

    code = "demo_failed"


def database_url(base_url: str, name: str) -> str:
    """``base_url`` pointing at database ``name`` instead."""
    if not _DATABASE_NAME.fullmatch(name) or len(name) > 63:
        raise DemoFailed(f"demo database name must match {_DATABASE_NAME.pattern}")
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def prepare_database(base_url: str, name: str) -> tuple[str, list[str]]:
    """Create database ``name`` afresh and migrate it; (its URL, migrations applied).

    Recreated on every run: a run that was interrupted leaves held jobs and running broadcasts
    behind, and the next run's dispatcher would otherwise pick them up.
    """
    url = database_url(base_url, name)
    admin = await connect(urlunsplit(urlsplit(base_url)._replace(path="/postgres")))
    try:
        # An identifier cannot be a parameter; ``name`` matched _DATABASE_NAME above.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await connect(url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    return url, applied


def demo_recipients(count: int) -> list[dict[str, object]]:
    """``count`` distinct personalised recipients in four countries."""
    used: dict[str, int] = {}
    recipients: list[dict[str, object]] = []
    for i in range(count):
        prefix, digits = _COUNTRY_NUMBERS[i % len(_COUNTRY_NUMBERS)]
        n = used[prefix] = used.get(prefix, -1) + 1
        recipients.append({"to": f"{prefix}{n:0{digits}d}",
                           "vars": {"name": f"customer {i + 1}", "order": f"#{10_000 + i}"}})
    return recipients


def extra_recipients(opted_out: str, duplicate: str) -> list[dict[str, object]]:
    """Recipients the pre-flight skips: two invalid numbers, an opted-out one, a duplicate."""
    return [{"to": to, "vars": {"name": "skipped", "order": "-"}}
            for to in ("+1415555", "+99912345678", opted_out, duplicate)]


@dataclass(frozen=True)
class SandboxCredentials:
    """The sandbox's made-up Twilio account."""

    account_sid: str
    auth_token: str

    @classmethod
    def random(cls) -> SandboxCredentials:
        return cls("AC" + secrets.token_hex(16), secrets.token_hex(16))


def uses_real_twilio(settings: Settings) -> bool:
    """True when real Twilio credentials are set and no sandbox URL overrides them."""
    return bool(settings.twilio_account_sid and settings.twilio_auth_token
                and not settings.twilio_base_url)


def dispatcher_env(settings: Settings, db_url: str, prefix: str, port: int,
                   sandbox: tuple[str, SandboxCredentials] | None,
                   rate_per_second: float) -> dict[str, str]:
    """``DISPATCHER_*`` for the child dispatcher: the demo database, prefix and port."""
    env = {"DATABASE_URL": db_url, "AMQP_URL": settings.amqp_url, "AMQP_PREFIX": prefix,
           "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port),
           "SENDER_RATE_PER_SECOND": str(rate_per_second), "LOG_FORMAT": "json",
           "LOG_LEVEL": "info", "SHUTDOWN_TIMEOUT_SECONDS": "10",
           "HOLD_SWEEP_INTERVAL_SECONDS": "1", "METRICS_INTERVAL_SECONDS": "1",
           "DB_POOL_MAX": "20"}
    if sandbox is None:
        # Real Twilio: its callbacks must reach us at the configured public URL.
        env |= {"PUBLIC_BASE_URL": settings.public_base_url,
                "TWILIO_ACCOUNT_SID": settings.twilio_account_sid,
                "TWILIO_AUTH_TOKEN": settings.twilio_auth_token}
    else:
        base_url, creds = sandbox
        env |= {"PUBLIC_BASE_URL": f"http://127.0.0.1:{port}", "TWILIO_BASE_URL": base_url,
                "TWILIO_ACCOUNT_SID": creds.account_sid, "TWILIO_AUTH_TOKEN": creds.auth_token}
    return {f"DISPATCHER_{k}": v for k, v in env.items()}


def billing_env(settings: Settings, db_url: str, prefix: str,
                charge_latency_seconds: float) -> dict[str, str]:
    """``BILLING_*`` for the reference billing service, charging the fake gateway's ok token."""
    env = {"DATABASE_URL": db_url, "AMQP_URL": settings.amqp_url, "AMQP_PREFIX": prefix,
           "DEFAULT_PRIMARY": "tok_ok", "OUTBOX_SWEEP_SECONDS": "0.5",
           "FAKE_CHARGE_LATENCY_SECONDS": str(charge_latency_seconds),
           "BACKOFF_BASE_SECONDS": "1", "SHUTDOWN_TIMEOUT_SECONDS": "5", "LOG_FORMAT": "json"}
    return {f"BILLING_{k}": v for k, v in env.items()}


async def billing_consuming(amqp_url: str, prefix: str) -> bool:
    """True once the billing service consumes its queue."""
    queue_name = BillingSettings(amqp_prefix=prefix).queue
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        result = queue.declaration_result
        return bool(result.consumer_count)


async def drop_demo_topology(amqp_url: str, prefix: str) -> None:
    """Delete every queue and exchange the demo's prefix created."""
    billing = BillingSettings(amqp_prefix=prefix)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in (f"{prefix}.credits", billing.queue, billing.dead_queue):
            await channel.queue_delete(queue)
        await delete_all(channel, Names(prefix))
