"""The staging area behind the consumer: deliveries of an account with a backlog, in PostgreSQL.

A staged delivery is a copy of the AMQP message (body, properties, headers) in ``staged_jobs``;
the broker's copy is acked once the copy is committed. A process claims staged deliveries
under a lease, hands them to its workers like AMQP messages, and deletes each when its outcome
is committed (its ``ack``); a claim whose process died lapses and is claimed again, and the job
id makes that redelivery harmless, exactly as for a broker redelivery.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import structlog
from aio_pika.abc import HeadersType

from dispatcher.events.listener import DATABASE_ERRORS
from dispatcher.jobs.group_commit import GroupCommit
from dispatcher.queries import q

log = structlog.get_logger(__name__)

COLUMNS = ["lane", "account_id", "job_id", "message_id", "kind", "exchange", "routing_key",
           "content_type", "sent_at", "headers", "body"]


class Delivery(Protocol):
    """What the consumer reads of a delivery, from the broker or from the staging area."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> HeadersType: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def redelivered(self) -> bool | None: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def exchange(self) -> str | None: ...

    async def ack(self, multiple: bool = False) -> None: ...
    async def nack(self, multiple: bool = False, requeue: bool = True) -> None: ...


@dataclass
class StagedDelivery:
    """A staged delivery claimed by this process: ``ack`` deletes it, ``nack`` hands it back."""

    area: StagingArea
    seq: int
    body: bytes
    headers: HeadersType
    content_type: str | None
    message_id: str | None
    timestamp: datetime | None
    type: str | None
    redelivered: bool | None
    routing_key: str | None
    exchange: str | None

    async def ack(self, multiple: bool = False) -> None:
        await self.area.done(self.seq)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        await self.area.release([self.seq])


class StagingArea:
    """Stage, claim, ack and release deliveries in ``staged_jobs``; claims belong to this
    process (a fresh id per process) and lapse ``lease_seconds`` after their last renewal."""

    def __init__(self, pool: asyncpg.Pool, lease_seconds: float = 30.0) -> None:
        self._pool = pool
        self.lease_seconds = lease_seconds
        self.owner = uuid.uuid4().hex
        self._done: GroupCommit[int, None] = GroupCommit(
            self._done_batch, self._done_one, max_batch=500, concurrency=1)
        self.claimed = 0  # claims of this process not yet acked or released

    async def stage(self, rows: Iterable[tuple[Any, ...]]) -> int:
        """Copy deliveries in, in the order given (their seq follows it); how many."""
        records = list(rows)
        async with self._pool.acquire() as conn:
            await conn.copy_records_to_table("staged_jobs", records=records, columns=COLUMNS)
        return len(records)

    async def claim(self, account: str, lane: int, limit: int) -> list[StagedDelivery]:
        """Up to ``limit`` of the account's oldest unclaimed deliveries in ``lane``, in order."""
        rows = await self._pool.fetch(q("staged_claim"), account, lane, self.owner, limit,
                                      self.lease_seconds)
        self.claimed += len(rows)
        return [StagedDelivery(
            self, r["seq"], bytes(r["body"]), json.loads(r["headers"]), r["content_type"],
            r["message_id"], r["sent_at"], r["kind"], r["claims"] > 1, r["routing_key"],
            r["exchange"]) for r in sorted(rows, key=lambda r: r["seq"])]

    async def done(self, seq: int) -> None:
        """The delivery's outcome is committed: delete it (a failure only means it comes back
        after its lease, and its job id makes that harmless)."""
        self.claimed -= 1
        try:
            await self._done.submit(seq)
        except DATABASE_ERRORS as exc:
            log.warning("staged_ack_failed", error=type(exc).__name__)

    async def _done_batch(self, seqs: list[int]) -> list[None]:
        await self._pool.execute(q("staged_done"), seqs, self.owner)
        return [None] * len(seqs)

    async def _done_one(self, seq: int) -> None:
        await self._done_batch([seq])

    async def release(self, seqs: list[int]) -> None:
        """Hand claimed deliveries back unhandled (stopping): claimable again at once."""
        self.claimed -= len(seqs)
        try:
            await self._pool.execute(q("staged_release"), seqs, self.owner)
        except DATABASE_ERRORS as exc:
            log.warning("staged_release_failed", error=type(exc).__name__)

    async def renew(self) -> None:
        """Extend this process's claims (nothing to do while it holds none)."""
        if self.claimed > 0:
            await self._pool.execute(q("staged_renew"), self.owner, self.lease_seconds)

    async def waiting(self) -> list[tuple[int, str]]:
        """(lane, account) pairs with staged deliveries that nobody holds."""
        return [(r["lane"], r["account_id"]) for r in await self._pool.fetch(
            q("staged_waiting"))]

    async def weights(self) -> dict[str, int]:
        """Accounts whose fair weight is not 1."""
        return {r["id"]: r["fair_weight"] for r in await self._pool.fetch(q("fair_weights"))}


def staged_row(lane: int, account: str, job_id: str | None, message: Delivery) -> tuple[Any, ...]:
    """The ``staged_jobs`` row (``COLUMNS``) of one delivery."""
    return (lane, account, job_id, message.message_id, message.type, message.exchange,
            message.routing_key, message.content_type, message.timestamp,
            json.dumps(dict(message.headers or {}), default=_header_value), message.body)


def _header_value(value: object) -> object:
    """AMQP header values JSON cannot carry as they are."""
    if isinstance(value, bytes | bytearray):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
