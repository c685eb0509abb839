"""The idiomatic build a team would write instead of the dispatcher (issue 15's peer).

``python -m bench.peer_idiomatic --amqp-url URL --queue Q --count N --prefetch P --dsn DSN
--twilio-base-url URL --account-sid SID --auth-token TOKEN``

A plain aio-pika + asyncpg worker, one process, uvloop, no batching of any kind. It consumes Q
with ``prefetch_count = P`` (so at most P jobs, hence P provider calls, in flight) and handles
every delivery as its own task, the usual way:

1. **parse**: the job's JSON validated by a pydantic model (id, account, to, from, body);
2. **reserve** (one transaction, asyncpg pool of 10 connections): ``SELECT balance ... FOR
   UPDATE`` of the account row, check the balance covers the job's credits (one per 153-char
   segment, one for a single-segment text), ``UPDATE`` the balance, ``INSERT`` the job row
   (``reserved``; ``ON CONFLICT DO NOTHING``: a redelivered job already reserved is not charged
   again, and one already sent is acked without a second create);
3. **send**: ``client.messages.create_async(to, from_, body, status_callback)`` of the official
   ``twilio`` library with its stock ``AsyncTwilioHttpClient`` (aiohttp), the API domain's base
   URL pointed at the sandbox;
4. **capture** (one transaction): ``UPDATE`` the job row to ``sent`` with the SID and
   ``sent_at``, ``INSERT`` a ``capture`` row in its ledger;
5. **ack** the delivery (one ``basic.ack`` per message).

Its tables (``peer_accounts``, ``peer_jobs``, ``peer_ledger``) live in the benchmark's database
beside the dispatcher's, seeded by ``bench.pipeline_peer`` with the same account ids. It opens
its pool and channel, prints ``ready``, waits for a line on stdin (so the benchmark can read its
CPU and its PostgreSQL backends' CPU at the start), consumes ``N`` jobs and prints one JSON line:
jobs handled and this process's CPU seconds since ``ready``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel, Field
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_accounts (
    id text PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS peer_jobs (
    job_id text PRIMARY KEY,
    account_id text NOT NULL REFERENCES peer_accounts (id),
    credits integer NOT NULL,
    status text NOT NULL,
    sid text,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);
CREATE TABLE IF NOT EXISTS peer_ledger (
    id bigserial PRIMARY KEY,
    job_id text NOT NULL REFERENCES peer_jobs (job_id),
    account_id text NOT NULL REFERENCES peer_accounts (id),
    kind text NOT NULL,
    amount bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""
POOL_SIZE = 10
CALLBACK = "http://127.0.0.1:9/twilio/status"


class Job(BaseModel):
    """The fields of the wire job the peer uses (the rest is ignored)."""

    id: str
    account: str
    to: str
    from_: str = Field(alias="from")
    body: str


def credits_for(body: str) -> int:
    """One credit per SMS segment (153 characters once it is more than one)."""
    return 1 if len(body) <= 160 else -(-len(body) // 153)


class Peer:
    """reserve → create → capture → ack, one delivery at a time per task."""

    def __init__(self, pool: asyncpg.Pool, client: Any, count: int) -> None:
        self._pool = pool
        self._client = client
        self._count = count
        self.handled = 0
        self.refused = 0
        self.done = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        job = Job.model_validate_json(message.body)
        credits = credits_for(job.body)
        if await self._reserve(job, credits):
            sent = await self._client.messages.create_async(
                to=job.to, from_=job.from_, body=job.body, status_callback=CALLBACK)
            await self._capture(job, credits, sent.sid)
        await message.ack()
        self.handled += 1
        if self.handled >= self._count:
            self.done.set()

    async def _reserve(self, job: Job, credits: int) -> bool:
        """Lock the account, check and take the credits, insert the job: one transaction.
        False when the job needs no send (already sent, or the account cannot pay)."""
        async with self._pool.acquire() as conn, conn.transaction():
            balance = await conn.fetchval(
                "SELECT balance FROM peer_accounts WHERE id = $1 FOR UPDATE", job.account)
            if balance is None or balance < credits:
                self.refused += 1
                return False
            inserted = await conn.fetchval(
                "INSERT INTO peer_jobs (job_id, account_id, credits, status)"
                " VALUES ($1, $2, $3, 'reserved') ON CONFLICT (job_id) DO NOTHING"
                " RETURNING job_id", job.id, job.account, credits)
            if inserted is None:  # redelivered: charged already; send only if not yet sent
                status = await conn.fetchval(
                    "SELECT status FROM peer_jobs WHERE job_id = $1", job.id)
                return bool(status == "reserved")
            await conn.execute(
                "UPDATE peer_accounts SET balance = balance - $2 WHERE id = $1",
                job.account, credits)
            return True

    async def _capture(self, job: Job, credits: int, sid: str) -> None:
        """Mark the job sent and write its capture: one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE peer_jobs SET status = 'sent', sid = $2, sent_at = now()"
                " WHERE job_id = $1", job.id, sid)
            await conn.execute(
                "INSERT INTO peer_ledger (job_id, account_id, kind, amount)"
                " VALUES ($1, $2, 'capture', $3)", job.id, job.account, credits)


def twilio_client(base_url: str, account_sid: str, auth_token: str) -> Any:
    """The official client, its stock async HTTP client, the API domain at ``base_url``."""
    client = Client(account_sid, auth_token, http_client=AsyncTwilioHttpClient())
    client.api.base_url = base_url.rstrip("/")
    return client


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> dict[str, float]:
    pool = await asyncpg.create_pool(args.dsn, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                     server_settings={"application_name": "peer"})
    assert pool is not None
    client = twilio_client(args.twilio_base_url, args.account_sid, args.auth_token)
    connection = await aio_pika.connect_robust(args.amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await channel.get_queue(args.queue)
        peer = Peer(pool, client, args.count)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started = cpu_seconds()
        await queue.consume(peer.on_message)
        await peer.done.wait()
        cpu = cpu_seconds() - started
    finally:
        await connection.close()
        await client.http_client.close()
        await pool.close()
    return {"handled": float(peer.handled), "refused": float(peer.refused), "cpu_seconds": cpu}


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``ready``, then (after a line on stdin) one JSON report on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.peer_idiomatic")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--twilio-base-url", required=True)
    parser.add_argument("--account-sid", required=True)
    parser.add_argument("--auth-token", required=True)
    args = parser.parse_args(argv)
    import uvloop
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
