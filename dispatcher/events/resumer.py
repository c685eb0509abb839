"""Resume paused accounts by themselves when credits arrive, releasing held jobs in order.

PostgreSQL NOTIFYs ``dispatcher_resume`` whenever a paused account's available credits grow
(a grant, a release, a refund reversed). The resumer then releases that account's held jobs in
batches, oldest first, and sends each batch in order before taking the next, so later jobs
(held behind them while the account stays paused) never overtake.

The LISTEN is kept up across connection losses (``keep_listening``), every paused account gets a
pass after each (re)connect, and a slow sweep of paused accounts with credits covers any
wake-up still missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

from dispatcher.db import Connect
from dispatcher.events.listener import DATABASE_ERRORS, DEFAULT_POLICY, ListenPolicy, keep_listening
from dispatcher.jobs.outcomes import Outcome
from dispatcher.metrics import Metrics, kind_label
from dispatcher.queries import q

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "dispatcher_resume"
RETRY_SECONDS = 1.0
SWEEP_SECONDS = 60.0
SendReleased = Callable[[bytes, int], Awaitable[Outcome]]


class Resumer:
    """Listens for credits reaching paused accounts and drains their held jobs.

    Accounts drain side by side (a few at a time), so one account's long backlog never delays
    another's resume; within an account the held jobs are sent one after the other, in order.
    """

    def __init__(self, pool: asyncpg.Pool, send_released: SendReleased, metrics: Metrics,
                 batch: int = 20, max_accounts: int = 4, *,
                 listen_connect: Connect | None = None, sweep_seconds: float = SWEEP_SECONDS,
                 listen_policy: ListenPolicy = DEFAULT_POLICY) -> None:
        self._pool = pool
        self._listen_connect = listen_connect
        self._sweep_seconds = sweep_seconds
        self._listen_policy = listen_policy
        self._send = send_released
        self._metrics = metrics
        self._batch = batch
        self._slots = asyncio.Semaphore(max_accounts)
        self._running: dict[str, asyncio.Task[None]] = {}
        # Woken while draining: credits may have arrived after its last release, go again.
        self._again: set[str] = set()

    def wake(self, account_id: str) -> None:
        """Ask for one pass over this account (wake-ups while it drains collapse into one)."""
        if account_id in self._running:
            self._again.add(account_id)
            return
        task = asyncio.create_task(self._passes(account_id), name=f"resume-{account_id}")
        self._running[account_id] = task

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.wake(str(payload))

    async def run(self, stop: asyncio.Event) -> None:
        """Serve wake-ups until ``stop``; every paused account gets a pass whenever LISTEN
        (re)starts, and those with credits one every ``sweep_seconds``."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(keep_listening(
                    self._pool, self._listen_connect, NOTIFY_CHANNEL, self._notified,
                    self._wake_all_paused, stop, policy=self._listen_policy,
                    reconnected=self._metrics.listen_reconnects.labels(listener="resumer").inc))
                tasks.create_task(self._sweep(stop))
        finally:
            drains = list(self._running.values())
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)

    async def _wake_all_paused(self) -> None:
        for row in await self._pool.fetch(q("paused_accounts")):
            self.wake(row["id"])
        for row in await self._pool.fetch(q("guard_held_accounts_due")):
            self.wake(row["id"])

    async def _sweep(self, stop: asyncio.Event) -> None:
        """A wake-up for every paused account with credits, in case a NOTIFY was missed, and
        for every account whose guard-held jobs may go (the next UTC day has begun)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._sweep_seconds)
            if stop.is_set():
                return
            try:
                rows = await self._pool.fetch(q("paused_accounts_with_credits"))
                # Jobs a spend guard held whose hold ended (a new UTC day, a velocity release).
                rows += await self._pool.fetch(q("guard_held_accounts_due"))
            except DATABASE_ERRORS as exc:
                log.warning("resume_sweep_failed", error=type(exc).__name__)
                continue
            for row in rows:
                self.wake(row["id"])

    async def _passes(self, account_id: str) -> None:
        """Drain the account, again as long as wake-ups arrived meanwhile."""
        try:
            while True:
                self._again.discard(account_id)
                async with self._slots:
                    try:
                        await self.resume(account_id)
                    except Exception:
                        # The jobs stay held (or `sending`, for the reconciler): try again soon.
                        log.exception("account_resume_failed", account_id=account_id)
                        await asyncio.sleep(RETRY_SECONDS)
                        self._again.add(account_id)
                if account_id not in self._again:
                    return
        finally:
            del self._running[account_id]

    async def resume(self, account_id: str) -> str:
        """Release and send held jobs until none is left or credits run out."""
        async with self._pool.acquire() as lock_conn:
            # One resumer per account across replicas, so held jobs keep their order.
            if not await lock_conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))",
                                            account_id):
                return "busy"
            try:
                return await self._drain(account_id)
            finally:
                try:
                    await lock_conn.execute("SELECT pg_advisory_unlock(hashtext($1))",
                                            account_id)
                except BaseException:
                    # Pooled connections go back without a reset: ending the session is what
                    # releases a lock that could not be unlocked.
                    lock_conn.terminate()
                    raise

    async def _drain(self, account_id: str) -> str:
        sent = 0
        while True:
            rows = await self._pool.fetch(q("release_held"), account_id, self._batch)
            released = [r for r in rows if r["outcome"] == "released"]
            sent += await self._send_in_order(released)
            state = next((r["outcome"] for r in rows if r["outcome"] != "released"), None)
            if state == "resumed" or not rows:
                log.info("account_resumed", account_id=account_id, released=sent)
                return "resumed"
            if state == "still_paused" and not released:
                log.info("account_still_paused", account_id=account_id, released=sent)
                return "still_paused"

    async def _send_in_order(self, released: list[asyncpg.Record]) -> int:
        """Send released jobs one after the other (arrival order); returns how many."""
        if not released:
            return 0
        versions = {r["job_id"]: r["updated_at"] for r in await self._pool.fetch(
            q("released_versions"), [r["job_id"] for r in released])}
        sent = 0
        for row in released:
            if await self._pool.fetchval(q("claim_released_job"), row["job_id"],
                                         versions[row["job_id"]]) is None:
                # It waited past the reconciler's grace and the reconciler took it over.
                log.warning("released_job_taken_over", job_id=row["job_id"])
                continue
            self._metrics.jobs.labels(kind=kind_label(row["kind"]), outcome="released").inc()
            await self._send(row["payload"].encode(), row["attempts"])
            sent += 1
        return sent


async def sweep_holds(pool: asyncpg.Pool, metrics: Metrics, expiry_seconds: float) -> int:
    """Expire held jobs past the limit and refresh the held/paused gauges."""
    by_kind = await pool.fetch(
        q("expire_held_by_kind"), datetime.now(UTC) - timedelta(seconds=expiry_seconds), 1000)
    for row in by_kind:
        metrics.jobs.labels(kind=kind_label(row["kind"]), outcome="expired").inc(row["expired"])
    expired = sum(int(row["expired"]) for row in by_kind)
    if expired:
        log.warning("held_jobs_expired", jobs=expired)
    stats = await pool.fetchrow(q("held_stats"))
    assert stats is not None
    metrics.paused_accounts.set(stats["paused_accounts"])
    metrics.held_jobs.set(stats["held_jobs"])
    metrics.oldest_held_job_age_seconds.set(stats["oldest_age_seconds"])
    return expired
