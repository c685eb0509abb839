"""Configuration as one frozen value, built once from ``DISPATCHER_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/dispatcher"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment. Secrets are excluded from ``repr``."""

    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    # Prefix for every exchange and queue name, so deployments and test runs never collide.
    amqp_prefix: str = "dispatcher"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Public base URL Twilio uses to reach our status callbacks.
    public_base_url: str = "http://127.0.0.1:8080"
    twilio_account_sid: str = ""
    twilio_auth_token: str = field(default="", repr=False)
    # Empty means the real api.twilio.com; set to a sandbox URL to send there instead.
    twilio_base_url: str = ""
    twilio_timeout_seconds: float = 10.0
    sender_rate_per_second: float = 100.0
    # Unacked deliveries per work queue.
    prefetch: int = 200
    # Provider calls in flight at once (the bound Twilio sees).
    max_in_flight: int = 200
    # Jobs handled at once: reserving, waiting for a provider slot, sending, recording; 0 means
    # max_in_flight. Above it, database round trips overlap provider calls (latency hidden
    # better), at the price of a longer wait for transactional jobs behind a bulk backlog.
    workers: int = 0
    delivery_limit: int = 5
    hold_expiry_seconds: float = 72 * 3600.0
    hold_sweep_interval_seconds: float = 30.0
    # Safety net behind the resume NOTIFY: how often paused accounts with credits get a pass.
    resume_sweep_interval_seconds: float = 60.0
    # How long a job may sit in `sending`/`unknown` before we ask the provider about it.
    reconcile_grace_seconds: float = 60.0
    reconcile_interval_seconds: float = 15.0
    # How often retry_wait jobs that came due are claimed and sent.
    retry_sweep_interval_seconds: float = 1.0
    # How often database-wide metrics (credits moved, from the ledger) are sampled.
    metrics_interval_seconds: float = 5.0
    shutdown_timeout_seconds: float = 25.0
    db_pool_min: int = 2
    db_pool_max: int = 10
    db_command_timeout_seconds: float = 30.0
    log_format: str = "console"
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``DISPATCHER_<FIELD>`` for every field; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"DISPATCHER_{f.name.upper()}")
            if raw is None:
                continue
            default = f.default
            if isinstance(default, bool):
                values[f.name] = raw.strip().lower() in {"1", "true", "yes", "on"}
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)  # type: ignore[arg-type]

    @property
    def worker_count(self) -> int:
        """``workers``, or ``max_in_flight`` when it is left at 0."""
        return self.workers or self.max_in_flight

    @property
    def uses_sandbox(self) -> bool:
        """True when no real Twilio credentials are configured."""
        return not (self.twilio_account_sid and self.twilio_auth_token) or bool(
            self.twilio_base_url
        )
