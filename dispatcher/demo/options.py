"""The demo's knobs, kept apart so the command line can show defaults without importing it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoOptions:
    """Sizes chosen so the broadcast tops up twice and pauses at zero, in seconds.

    Recipients cost one credit each and broadcasts reserve in batches of 100; every fake charge
    takes ``charge_latency_seconds``, far longer than sending 200 recipients, so the pause is
    not left to the machine's speed. From 200 credits, the first batch leaves 100, below the
    threshold of 150: ``balance.low`` starts a top-up of 1,650; the second batch takes the last
    100 and the next finds none: the account pauses at zero, its recipients held in order,
    until the top-up arrives and the held ones are released oldest first. Spending 1,600 more
    takes the balance to 50, below the threshold again, so the second top-up (1,650) starts;
    whether the account is still releasing held recipients then or pauses a second time is a
    matter of timing. 1,500 credits remain at the end, above the threshold, so no top-up is
    left in flight. Keep ``amount`` at 50 modulo 100, ``amount < recipients - 200`` and
    ``2 * amount >= recipients - 50`` when changing the sizes.
    """

    recipients: int = 2000
    balance: int = 200
    threshold: int = 150
    amount: int = 1650
    latency_ms: int = 5
    rate_per_second: float = 600.0
    charge_latency_seconds: float = 1.5
    database: str = "dispatcher_demo"
    timeout_seconds: float = 240.0  # a safety net: a quiet machine needs ~20 s
    to: tuple[str, ...] = ()  # real recipients, required with real Twilio credentials
