"""The demo's knobs, kept apart so the command line can show defaults without importing it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoOptions:
    """Sizes chosen so the broadcast runs out once, tops up, resumes, all in seconds.

    2,000 one-credit recipients against 200 credits: falling below 150 starts a 1,700 top-up,
    the account still pauses at zero with the last ~100 held, the ``balance.depleted`` top-up
    releases them, and the balance ends above the threshold (no top-up left in flight).
    """

    recipients: int = 2000
    balance: int = 200
    threshold: int = 150
    amount: int = 1700
    latency_ms: int = 5
    rate_per_second: float = 600.0
    database: str = "dispatcher_demo"
    timeout_seconds: float = 240.0  # a safety net: a quiet machine needs ~20 s
    to: tuple[str, ...] = ()  # real recipients, required with real Twilio credentials
