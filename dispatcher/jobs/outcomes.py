"""What handling a job came to; only the consumer turns these into acks, retries, dead letters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Done:
    """Handled (sent, failed, held or a duplicate): acknowledge."""

    result: str


@dataclass(frozen=True)
class RetryLater:
    """Try again after a delay chosen from ``attempt``."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    """Never retry: park the job on the dead-letter queue with this reason."""

    reason: str
    detail: str
    job_id: str | None = None
    account_id: str | None = None
    # The job's kind and metadata when known: a ``dead_lettered`` status event echoes them.
    kind: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


Outcome = Done | RetryLater | DeadLetter
