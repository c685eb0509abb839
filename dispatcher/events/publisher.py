"""The helper publishers use to send jobs correctly by default.

Jobs go to the topic exchange ``<prefix>.jobs`` with routing key ``<kind>.<priority>``:
``sms.transactional``, ``sms.bulk``, ``call.transactional``, ``call.bulk``,
``broadcast.transactional``, ``broadcast.bulk``. Each job is validated locally with the same
models and size limits the dispatcher applies, stamped with ``created_at`` (the publish time,
unless the job has one: the dispatcher measures end-to-end latency from it), published
persistent with ``message_id`` = job id and ``type`` = kind, and the call returns only once
the broker has confirmed it. An unroutable job (no queue bound) raises instead of vanishing.
After a timeout the outcome is unknown: publish the same job again — the job id is the
idempotency key, so it is sent at most once. ``amqp_url`` may list a cluster's nodes
comma-separated: the connection goes to the first that answers and moves to another when its
node dies (a publish in flight then fails: publish it again).
"""
# ``timeout`` parameters with defaults on purpose: publishes are bounded even if callers forget.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from billing_client.publisher import DEFAULT_TIMEOUT, ConfirmedPublisher, PublishFailed
from dispatcher.errors import DispatcherError, ServiceUnavailable
from dispatcher.jobs.contract import (
    MAX_BROADCAST_BYTES,
    MAX_JOB_BYTES,
    Job,
    encode_job,
    parse_job,
    routing_key,
)


class JobNotPublished(DispatcherError):
    """The broker did not confirm the job; publishing it again with the same id is safe."""

    code = "job_not_published"

    def __init__(self, reason: str, detail: str, *, job_id: str) -> None:
        super().__init__(f"{reason}: {detail}", reason=reason, job_id=job_id)
        self.reason = reason
        self.job_id = job_id


class JobPublisher:
    """Validates, then publishes jobs persistent and confirmed on the jobs exchange."""

    def __init__(self, publisher: ConfirmedPublisher, *, max_bytes: int = MAX_JOB_BYTES,
                 max_broadcast_bytes: int = MAX_BROADCAST_BYTES) -> None:
        self._publisher = publisher
        self._limits = {"max_bytes": max_bytes, "max_broadcast_bytes": max_broadcast_bytes}

    @classmethod
    async def connect(cls, amqp_url: str, exchange_name: str, *,
                      timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_JOB_BYTES,
                      max_broadcast_bytes: int = MAX_BROADCAST_BYTES) -> Self:
        """Connect to the existing jobs exchange (``<prefix>.jobs``); else ServiceUnavailable."""
        try:
            publisher = await ConfirmedPublisher.connect(amqp_url, exchange_name,
                                                         timeout=timeout)
        except PublishFailed as exc:
            raise ServiceUnavailable(f"RabbitMQ: {exc}") from exc
        return cls(publisher, max_bytes=max_bytes, max_broadcast_bytes=max_broadcast_bytes)

    async def publish(self, job: Job | Mapping[str, Any], *,
                      timeout: float | None = None) -> Job:
        """Validate, publish and await the confirm; raises InvalidJob or JobNotPublished."""
        now = datetime.now(UTC)
        body = encode_job(_stamped(job, now))
        # Exactly the bytes the dispatcher will parse, checked the way it checks them.
        parsed = parse_job(body, **self._limits)
        try:
            await self._publisher.publish(
                body, routing_key=routing_key(parsed), message_id=parsed.id, type_=parsed.kind,
                timeout=timeout, timestamp=now)
        except PublishFailed as exc:
            raise JobNotPublished(exc.reason, exc.detail, job_id=parsed.id) from exc
        return parsed

    async def close(self) -> None:
        """Close the connection."""
        await self._publisher.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


def _stamped(job: Job | Mapping[str, Any], now: datetime) -> Job | Mapping[str, Any]:
    """The job with ``created_at`` set to ``now`` unless it has one (end-to-end latency)."""
    if isinstance(job, Mapping):
        return job if job.get("created_at") else {**job, "created_at": now.isoformat()}
    return job if job.created_at is not None else job.model_copy(update={"created_at": now})
