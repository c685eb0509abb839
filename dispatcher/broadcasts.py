"""Broadcasts: store one submission, then fan it out to per-recipient SMS jobs in batches.

Each batch is priced in Python and reserved in one round trip (``reserve_batch`` through
``begin_broadcast_batch``); what the balance cannot cover is held and the account pauses, so a
broadcast pauses and resumes with its account. Recipient job ids are ``<broadcast>:<seq>``,
which makes a re-run of a batch after a crash a no-op.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from dispatcher.contract import BroadcastJob
from dispatcher.errors import DispatcherError, UnknownAccount
from dispatcher.numbers import CountryResolver
from dispatcher.outcomes import Outcome
from dispatcher.preflight import AutoRecharge, PreflightResult, Template, preflight
from dispatcher.pricing import count_segments
from dispatcher.queries import q
from dispatcher.rates import RateCache

log = structlog.get_logger(__name__)

SendReleased = Callable[[bytes, int], Awaitable[Outcome]]


@dataclass(frozen=True)
class Progress:
    """Where a broadcast stands."""

    broadcast_id: str
    status: str
    total: int
    skipped: int
    pending: int
    sending: int
    sent: int
    delivered: int
    failed: int
    held: int
    canceled: int
    credits_spent: int

    def as_json(self) -> dict[str, object]:
        return dict(vars(self))


class BroadcastShort(DispatcherError):
    """The account cannot pay for this broadcast and auto-recharge is off."""

    code = "insufficient_credits"


OptedOut = Callable[[asyncpg.Pool, str, list[str]], Awaitable[set[str]]]


class Broadcasts:
    """Pre-flight and submission, shared by the HTTP API and AMQP broadcast jobs."""

    def __init__(self, pool: asyncpg.Pool, rates: RateCache, opted_out: OptedOut,
                 wake: Callable[[], None] = lambda: None) -> None:
        self._pool = pool
        self._rates = rates
        self._opted_out = opted_out
        self._wake = wake
        self._resolver = CountryResolver()

    async def preflight(self, account: str, body: str, footer: bool,
                        recipients: Sequence[Mapping[str, Any]]) -> PreflightResult:
        """Price a broadcast without writing anything."""
        row = await self._pool.fetchrow(q("preflight_account"), account)
        if row is None:
            raise UnknownAccount(f"no account {account!r}", account_id=account)
        numbers = [str(r.get("to", "")) for r in recipients]
        opted_out = await self._opted_out(self._pool, account, numbers)
        auto = AutoRecharge(row["auto_recharge_enabled"], row["auto_recharge_threshold"],
                            row["auto_recharge_amount"])
        return preflight(body, footer, recipients, await self._rates.get(), opted_out,
                         row["available"], auto, self._resolver)

    async def submit(self, broadcast_id: str, job: BroadcastJob, *,
                     refuse_if_short: bool) -> tuple[PreflightResult, bool]:
        """Pre-flight, then store and start it; (result, False) for a replayed id."""
        result = await self.preflight(job.account, job.body, job.footer, job.recipients)
        if refuse_if_short and result.advice in ("enable_auto_recharge", "top_up"):
            raise BroadcastShort(
                f"{result.shortfall} more credits are needed", shortfall=result.shortfall,
                advice=result.advice)
        stored = await store_broadcast(self._pool, broadcast_id, job, result)
        if stored:
            self._wake()
        return result, stored


async def store_broadcast(pool: asyncpg.Pool, broadcast_id: str, job: BroadcastJob,
                          result: PreflightResult) -> bool:
    """Write the broadcast and its recipients (COPY); False if that id already exists."""
    billable = set(result.billable_indexes)
    rows = [(broadcast_id, i, r["to"], json.dumps(r.get("vars") or {}),
             "pending" if i in billable else "skipped", None if i in billable else "skipped")
            for i, r in enumerate(job.recipients)]
    async with pool.acquire() as conn, conn.transaction():
        created = await conn.fetchval(
            q("broadcast_insert"), broadcast_id, job.account, job.priority, job.from_,
            job.messaging_service_sid, job.body, job.footer, result.recipients,
            result.recipients - result.billable, result.credits)
        if created is None:
            return False
        await conn.copy_records_to_table(
            "broadcast_recipients", records=rows,
            columns=["broadcast_id", "seq", "to_number", "vars", "status", "skip_reason"])
    log.info("broadcast_stored", broadcast_id=broadcast_id, account_id=job.account,
             recipients=result.recipients, billable=result.billable)
    return True


class BroadcastRunner:
    """Fans running broadcasts out, batch by batch, sending each reserved job once."""

    def __init__(self, pool: asyncpg.Pool, rates: RateCache, send: SendReleased, *,
                 batch: int = 100, concurrency: int = 50) -> None:
        self._pool = pool
        self._rates = rates
        self._send = send
        self._batch = batch
        self._concurrency = asyncio.Semaphore(concurrency)
        self._resolver = CountryResolver()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A broadcast was submitted: look for work now."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Work through running broadcasts until ``stop``; sleep until woken when idle."""
        while not stop.is_set():
            self._wake.clear()
            worked = False
            for row in await self._pool.fetch(q("running_broadcasts")):
                worked |= await self.step(row)
            if not worked:
                waiters = [asyncio.create_task(self._wake.wait()),
                           asyncio.create_task(stop.wait())]
                await asyncio.wait(waiters, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()

    async def step(self, broadcast: asyncpg.Record) -> bool:
        """Reserve and send one batch of a broadcast; False when it had nothing pending."""
        pending = await self._pool.fetch(q("broadcast_pending_batch"), broadcast["id"],
                                         self._batch)
        if not pending:
            await self._pool.fetchval(q("broadcast_finish_if_done"), broadcast["id"])
            return False
        args = await self._batch_args(broadcast, pending)
        to_send = [r["job_id"] for r in await self._pool.fetch(q("begin_broadcast_batch"),
                                                                broadcast["id"], *args)]
        payloads = dict(zip(args[1], args[2], strict=True))
        await asyncio.gather(*(self._send_one(payloads[job_id]) for job_id in to_send))
        return bool(to_send)

    async def _send_one(self, payload: str) -> None:
        async with self._concurrency:
            await self._send(payload.encode(), 1)

    async def _batch_args(self, b: asyncpg.Record,
                          pending: Sequence[asyncpg.Record]) -> list[Any]:
        rates = await self._rates.get()
        template = Template(b["body"], b["footer"])
        seqs, ids, payloads, estimates, countries, units, unit_rates = [], [], [], [], [], [], []
        for r in pending:
            country = self._resolver.resolve(r["to_number"]) or "*"
            text = template.render(json.loads(r["vars"]))
            segments = count_segments(text).segments
            rate = rates.rate("sms", country)
            job_id = f"{b['id']}:{r['seq']}"
            payload: dict[str, Any] = {
                "schema_version": 1, "id": job_id, "kind": "sms", "account": b["account_id"],
                "to": r["to_number"], "body": text, "priority": b["priority"],
                "metadata": {"broadcast_id": b["id"]}}
            if b["messaging_service_sid"]:
                payload["messaging_service_sid"] = b["messaging_service_sid"]
            else:
                payload["from"] = b["sender"]
            seqs.append(r["seq"])
            ids.append(job_id)
            payloads.append(json.dumps(payload))
            estimates.append(max(segments * rate, 1))
            countries.append(country)
            units.append(segments)
            unit_rates.append(rate)
        return [seqs, ids, payloads, estimates, countries, units, unit_rates]


async def progress(pool: asyncpg.Pool, broadcast_id: str) -> Progress | None:
    """Counts by state, or None for an unknown broadcast."""
    b = await pool.fetchrow(q("broadcast_get"), broadcast_id)
    if b is None:
        return None
    p = await pool.fetchrow(q("broadcast_progress"), broadcast_id)
    assert p is not None
    return Progress(broadcast_id, b["status"], b["total"], b["skipped"], p["pending"],
                    p["sending"], p["sent"], p["delivered"], p["failed"], p["held"],
                    p["canceled"], p["credits_spent"])


async def cancel(pool: asyncpg.Pool, broadcast_id: str) -> str:
    """Stop unsent recipients; returns the broadcast's status afterwards."""
    return str(await pool.fetchval(q("broadcast_cancel"), broadcast_id))
