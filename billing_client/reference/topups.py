"""Charging in-flight top-ups: primary method, then backup; back off and retry; give up.

Each attempt runs on a leased top-up row (claimed with ``SKIP LOCKED``), so several workers or a
restarted process share the work. Every gateway request is recorded before it is sent: a request
whose outcome is unknown (timeout, crash) is retried later with the same idempotency key, and the
backup is never charged while the primary's outcome is unknown, so a customer is never charged
twice for one top-up.

Before every new charge the account's recharge safety rules are checked under its lock (see
``BillingStore.gate``): paused after consecutive declines, monthly cap, charges per hour. Only one
top-up is ever in flight per account, so that check and the charge cannot interleave with another.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import timedelta

import structlog

from billing_client.events import CreditsGranted, DeclinedCharge, TopupDisabled, TopupFailed
from billing_client.reference.decision import CAPPED, CHARGE, HOURLY, PAUSED, backoff_seconds
from billing_client.reference.errors import GatewayError
from billing_client.reference.gateway import (
    FAILURES,
    NO_PAYMENT_METHOD,
    ChargeResult,
    FailureRule,
    PaymentGateway,
)
from billing_client.reference.settings import BillingSettings
from billing_client.reference.store import (
    DATABASE_ERRORS,
    PAUSE_ADVICE,
    ROLES,
    BillingStore,
    Topup,
)
from billing_client.reference.waiting import wait_any

log = structlog.get_logger(__name__)

# A safety net: look for due top-ups at least this often even without a wake-up.
IDLE_POLL_SECONDS = 30.0
DATABASE_RETRY_SECONDS = 2.0
_UNSAFE_REFERENCE_CHARS = re.compile(r"[^A-Za-z0-9_.:/-]")


def payment_reference(charge_id: str) -> str:
    """The grant's reference, derived from the gateway's charge id (unique per charge)."""
    return f"auto-recharge:{_UNSAFE_REFERENCE_CHARS.sub('-', charge_id)}"[:128]


class TopupWorker:
    """Claims due top-ups and runs one charging attempt for each, a few at a time."""

    def __init__(self, store: BillingStore, gateway: PaymentGateway, settings: BillingSettings,
                 on_reply: Callable[[], None]) -> None:
        self._store = store
        self._gateway = gateway
        self._settings = settings
        self._on_reply = on_reply
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_concurrent_charges)
        self._tasks: set[asyncio.Task[None]] = set()
        # Two gateway calls per attempt, then some slack: past this lease another worker retries.
        self._lease = settings.charge_timeout_seconds * 2 + 10.0

    def wake(self) -> None:
        """Look for due top-ups now (a top-up was just created)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Start due attempts until ``stop`` is set; sleep until the next one is due."""
        while not stop.is_set():
            self._wake.clear()
            try:
                await self._start_due(stop)
                due_in = await self._store.seconds_until_due()
            except DATABASE_ERRORS as exc:
                log.warning("topup_worker_database_error", error=type(exc).__name__)
                due_in = DATABASE_RETRY_SECONDS
            timeout = IDLE_POLL_SECONDS if due_in is None else min(IDLE_POLL_SECONDS, due_in)
            await wait_any(self._wake, stop, seconds=max(0.05, timeout))

    async def drain(self, grace_seconds: float) -> None:
        """Let running attempts finish (bounded), then cancel the rest: their leases expire."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _start_due(self, stop: asyncio.Event) -> None:
        """Claim due top-ups while a charging slot is free and no stop was asked."""
        while True:
            await self._slots.acquire()
            if stop.is_set():
                self._slots.release()
                return
            topup = await self._claim()
            if topup is None:
                self._slots.release()
                return
            task = asyncio.create_task(self._guarded(topup), name=f"topup-{topup.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _claim(self) -> Topup | None:
        try:
            return await self._store.claim_due(self._lease)
        except BaseException:
            self._slots.release()
            raise

    async def _guarded(self, topup: Topup) -> None:
        """One attempt; a crash leaves the lease to expire so the attempt is retried."""
        try:
            await self.attempt(topup)
        except Exception:
            log.exception("topup_attempt_crashed", topup_id=topup.id, account_id=topup.account)
        finally:
            self._slots.release()
            self.wake()

    async def attempt(self, topup: Topup) -> None:
        """Charge the primary, then the backup; record success or the failed attempt."""
        methods = await self._methods(topup.account)
        rule, last_role = NO_PAYMENT_METHOD, None
        for role in ROLES:
            token = methods.get(role)
            if not token:
                continue
            gate = await self._store.gate(topup)
            if gate.decision != CHARGE:
                await self._stopped(topup, gate.decision, last_role)
                return
            result = await self._charge(topup, role, token)
            last_role = role
            if result.succeeded and result.charge_id is not None:
                await self._store.record_outcome(topup, role, result)
                await self._succeed(topup, role, result.charge_id)
                return
            rule = FAILURES[result.status]
            declines, limit, run = await self._store.record_outcome(topup, role, result)
            if limit and declines >= limit:
                await self._fail(topup, rule, role, disable=run)
                return
            if not rule.definite:
                break
        await self._fail(topup, rule, last_role)

    async def _stopped(self, topup: Topup, decision: str, role: str | None) -> None:
        """A safety rule stopped the charge: wait for the hourly window, or end the top-up."""
        log.warning("topup_held_by_rule", topup_id=topup.id, account_id=topup.account,
                    rule=decision)
        if decision == HOURLY:
            return  # rescheduled by the gate; no attempt is counted
        reason = {PAUSED: "auto_recharge_paused", CAPPED: "monthly_cap"}[decision]
        advice = ("Auto-recharge is paused after declined charges: an owner turns it back on."
                  if decision == PAUSED else
                  "The monthly recharge cap is reached: an owner may raise it, or it resets "
                  "next month.")
        failed = TopupFailed(account=topup.account, attempts=topup.attempts + 1, reason=reason,
                             advice=advice, next_attempt_at=None, amount=topup.amount,
                             payment_method=role, episode=topup.episode,
                             in_reply_to=topup.trigger_event_id, occurred_at=self._store.clock())
        if await self._store.finish_failure(topup, failed, gave_up=True):
            self._on_reply()

    async def _methods(self, account: str) -> dict[str, str]:
        """Registered auto-recharge methods, or the configured defaults when none are."""
        methods = await self._store.methods(account)
        if methods:
            return methods
        s = self._settings
        return {role: token for role, token in (("primary", s.default_primary),
                                                ("backup", s.default_backup)) if token}

    async def _charge(self, topup: Topup, role: str, token: str) -> ChargeResult:
        """One recorded, bounded gateway request."""
        row, key = await self._store.begin_charge(topup, role)
        try:
            async with asyncio.timeout(self._settings.charge_timeout_seconds):
                result = await self._gateway.charge(topup.account, token, topup.amount, key)
        except TimeoutError:
            result = ChargeResult("timeout", detail="charge_timeout")
        except GatewayError as exc:
            result = ChargeResult("error", detail=exc.code)
        if result.status == "succeeded" and result.charge_id is None:
            result = ChargeResult("error", detail="success_without_charge_id")
        await self._store.settle_charge(row, result)
        log.info("charge_attempted", topup_id=topup.id, account_id=topup.account, role=role,
                 status=result.status, attempt=topup.attempts + 1, amount=topup.amount)
        return result

    async def _succeed(self, topup: Topup, role: str, charge_id: str) -> None:
        grant = CreditsGranted(
            account=topup.account, amount=topup.amount, kind="auto_recharge",
            payment_reference=payment_reference(charge_id), payment_method=role,
            episode=topup.episode, in_reply_to=topup.trigger_event_id)
        if not await self._store.finish_success(topup, role, charge_id, grant):
            log.warning("topup_attempt_stale", topup_id=topup.id, account_id=topup.account)
            return
        self._on_reply()
        log.info("topup_succeeded", topup_id=topup.id, account_id=topup.account, role=role,
                 amount=topup.amount, episode=topup.episode,
                 payment_reference=grant.payment_reference)

    async def _fail(self, topup: Topup, rule: FailureRule, role: str | None, *,
                    disable: list[DeclinedCharge] | None = None) -> None:
        attempts = topup.attempts + 1
        now = self._store.clock()
        gave_up = attempts >= self._settings.max_attempts or disable is not None
        next_at = None if gave_up else now + timedelta(seconds=backoff_seconds(
            attempts, self._settings.backoff_base_seconds, self._settings.backoff_max_seconds))
        failed = TopupFailed(
            account=topup.account, attempts=attempts, reason=rule.reason, advice=rule.advice,
            next_attempt_at=next_at, amount=topup.amount, payment_method=role,
            episode=topup.episode, in_reply_to=topup.trigger_event_id, occurred_at=now)
        disabled = None if disable is None else TopupDisabled(
            account=topup.account, declines=len(disable), decline_reasons=disable[-50:],
            advice=PAUSE_ADVICE, occurred_at=now)
        if not await self._store.finish_failure(topup, failed, gave_up=gave_up,
                                                disabled=disabled):
            log.warning("topup_attempt_stale", topup_id=topup.id, account_id=topup.account)
            return
        self._on_reply()
        if disabled is not None:
            log.warning("auto_recharge_paused", account_id=topup.account,
                        declines=disabled.declines)
        log.warning("topup_gave_up" if gave_up else "topup_retry_scheduled", topup_id=topup.id,
                    account_id=topup.account, attempts=attempts, reason=rule.reason,
                    next_attempt_at=None if next_at is None else next_at.isoformat())
