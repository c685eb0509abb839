"""Configuration as one frozen value, built once from ``DISPATCHER_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/dispatcher"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SENDER_RATE_SCOPES = ("shared", "process")


class InvalidSetting(ValueError):
    """A ``DISPATCHER_*`` variable holds a value the service cannot use (the message names it)."""


def _num(default: float, low: float = 0.0, high: float | None = None, *,
         above: bool = False) -> Any:
    """A numeric field accepted from ``low`` (exclusive when ``above``) to ``high``."""
    return field(default=default, metadata={"low": low, "high": high, "above": above})


def _one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A text field that takes one of ``choices``."""
    return field(default=default, metadata={"choices": choices})


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment. Secrets are excluded from ``repr``."""

    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    # One address, or a RabbitMQ cluster's nodes comma-separated: the first that answers is
    # used, another on reconnect (billing_client.amqp).
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    # x-quorum-initial-group-size of the quorum queues declared (3 on a 3-node cluster); 0 leaves
    # it to RabbitMQ. Only applies to queues not yet declared: the broker refuses a change.
    amqp_quorum_group_size: int = _num(0)
    # Prefix for every exchange and queue name, so deployments and test runs never collide.
    amqp_prefix: str = "dispatcher"
    http_host: str = "127.0.0.1"
    http_port: int = _num(8080, 1, 65535)
    # Public base URL Twilio uses to reach our status callbacks.
    public_base_url: str = "http://127.0.0.1:8080"
    twilio_account_sid: str = ""
    twilio_auth_token: str = field(default="", repr=False)
    # Empty means the real api.twilio.com; set to a sandbox URL to send there instead.
    twilio_base_url: str = ""
    twilio_timeout_seconds: float = _num(10.0, above=True)
    sender_rate_per_second: float = _num(100.0, above=True)
    # `shared`: the rate holds across every replica on the same database (its buckets are in
    # PostgreSQL, taken a few turns at a time); `process`: each process paces alone, no
    # database work (one replica, or a limit meant per process).
    sender_rate_scope: str = _one_of("shared", SENDER_RATE_SCOPES)
    # Unacked deliveries per work queue.
    prefetch: int = _num(200, 1)
    # Provider calls in flight at once (the bound Twilio sees).
    max_in_flight: int = _num(200, 1)
    # Jobs handled at once: reserving, waiting for a provider slot, sending, recording; 0 means
    # max_in_flight. Above it, database round trips overlap provider calls (latency hidden
    # better), at the price of a longer wait for transactional jobs behind a bulk backlog.
    workers: int = _num(0)
    delivery_limit: int = _num(5, 1)
    # Fair share (dispatch.fairness): deliveries of one account and lane a process holds at
    # once (waiting or being handled); 0 means the worker count. Past it, with fair_staging 1,
    # the account's further deliveries wait in PostgreSQL so other accounts' jobs keep flowing.
    fair_share: int = _num(0)
    fair_staging: int = _num(1, 0, 1)
    # A staged delivery claimed by a process that died is claimed again after this long.
    staging_lease_seconds: float = _num(10.0, above=True)
    # How often staged deliveries nobody holds (another replica's, a crashed one's) are looked for.
    staging_scan_seconds: float = _num(5.0, above=True)
    hold_expiry_seconds: float = _num(72 * 3600.0, above=True)
    hold_sweep_interval_seconds: float = _num(30.0, above=True)
    # How often waiting jobs past their expires_at are ended (failed, reason expired).
    expiry_sweep_interval_seconds: float = _num(5.0, above=True)
    # Safety net behind the resume NOTIFY: how often paused accounts with credits get a pass.
    resume_sweep_interval_seconds: float = _num(60.0, above=True)
    # How long a job may sit in `sending`/`unknown` before we ask the provider about it.
    reconcile_grace_seconds: float = _num(60.0)
    reconcile_interval_seconds: float = _num(15.0, above=True)
    # How often retry_wait jobs that came due are claimed and sent.
    retry_sweep_interval_seconds: float = _num(1.0, above=True)
    # How often scheduled and deferred jobs (and scheduled broadcasts) that came due are released.
    release_sweep_interval_seconds: float = _num(1.0, above=True)
    # How often database-wide metrics (credits moved, from the ledger) are sampled.
    metrics_interval_seconds: float = _num(5.0, above=True)
    shutdown_timeout_seconds: float = _num(25.0)
    db_pool_min: int = _num(2)
    db_pool_max: int = _num(10, 1)
    db_command_timeout_seconds: float = _num(30.0, above=True)
    log_format: str = _one_of("console", LOG_FORMATS)
    log_level: str = _one_of("info", LOG_LEVELS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``DISPATCHER_<FIELD>`` for every field; unset ones keep their defaults.

        Raises ``InvalidSetting`` (one line: the variable, its value, what it accepts) rather
        than starting with a value it would misread.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f"DISPATCHER_{f.name.upper()}"
            raw = env.get(name)
            if raw is not None:
                values[f.name] = _parse(name, raw, f)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def worker_count(self) -> int:
        """``workers``, or ``max_in_flight`` when it is left at 0."""
        return self.workers or self.max_in_flight

    @property
    def fair_share_count(self) -> int:
        """``fair_share``, or the worker count when it is left at 0."""
        return self.fair_share or self.worker_count

    @property
    def uses_sandbox(self) -> bool:
        """True when no real Twilio credentials are configured."""
        return not (self.twilio_account_sid and self.twilio_auth_token) or bool(
            self.twilio_base_url
        )


def _parse(name: str, raw: str, f: Field[Any]) -> object:
    """One variable's value as its field's type, within the field's accepted values."""
    text, meta, default = raw.strip(), f.metadata, f.default
    if "choices" in meta:
        if text.lower() not in meta["choices"]:
            raise InvalidSetting(f"{name}={raw!r} is not accepted: use one of "
                                 + ", ".join(meta["choices"]))
        return text.lower()
    if not isinstance(default, int | float):
        return raw
    whole = isinstance(default, int)
    low, high, above = meta.get("low", 0), meta.get("high"), meta.get("above", False)
    bounds = (f" above {low:g}" if above else f" from {low:g} to {high:g}" if high is not None
              else f", at least {low:g}")
    accepted = ("a whole number" if whole else "a number") + bounds
    try:
        value: float = int(text) if whole else float(text)
    except ValueError:
        raise InvalidSetting(f"{name}={raw!r} is not accepted: use {accepted}") from None
    if value != value or value < low or (above and value == low) or (
            high is not None and value > high):
        raise InvalidSetting(f"{name}={raw!r} is not accepted: use {accepted}")
    return value
