"""The demo's knobs, kept apart so the command line can show defaults without importing it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoOptions:
    """Sizes chosen so the broadcast tops up, runs out once, pauses and resumes, in seconds.

    Recipients cost one credit each and broadcasts reserve in batches of 100. From 200 credits,
    the first batch leaves 100, below the threshold of 150: ``balance.low`` tops up 1,650 while
    the second batch is sent. From 1,650 the balance steps down by 100 to 50, which crosses
    the threshold again with less than a batch left, so the next batch runs out before that
    top-up can arrive: the account pauses with the last 150 recipients held, the
    ``balance.depleted`` top-up (1,650) releases them, and 1,500 credits remain, above the
    threshold, so no top-up is left in flight. Keep ``amount`` at 50 modulo 100 and
    ``2 * amount >= recipients - 50`` when changing the sizes.
    """

    recipients: int = 2000
    balance: int = 200
    threshold: int = 150
    amount: int = 1650
    latency_ms: int = 5
    rate_per_second: float = 600.0
    database: str = "dispatcher_demo"
    timeout_seconds: float = 240.0  # a safety net: a quiet machine needs ~20 s
    to: tuple[str, ...] = ()  # real recipients, required with real Twilio credentials
