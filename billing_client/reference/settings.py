"""Configuration of the reference billing service: one frozen value built from ``BILLING_*``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from billing_client.reference.errors import InvalidSettings

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/dispatcher"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class BillingSettings:
    """Everything the service reads from its environment; URLs and tokens stay out of ``repr``."""

    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    # Exchange ``<prefix>.billing``, queues ``<prefix>.billing-service`` and ``.dead``.
    amqp_prefix: str = "dispatcher"
    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    max_attempts: int = 3
    # Payment-method tokens used for an account that registered none for auto-recharge.
    default_primary: str = field(default="", repr=False)
    default_backup: str = field(default="", repr=False)
    # Our own bound on one gateway call; past it the charge's outcome is unknown.
    charge_timeout_seconds: float = 20.0
    # How long the fake gateway's ``tok_timeout`` hangs before answering ``timeout``.
    fake_timeout_delay_seconds: float = 1.0
    # How long every fake-gateway charge takes (the demo's top-ups arrive after a pause).
    fake_charge_latency_seconds: float = 0.0
    # Recharge safety defaults for accounts without their own: at most this many charges in
    # any hour, and auto-recharge pauses after this many declined charges in a row.
    hourly_charge_limit: int = 3
    decline_limit: int = 3
    delivery_limit: int = 5
    prefetch: int = 16
    max_concurrent_charges: int = 8
    outbox_sweep_seconds: float = 2.0
    shutdown_timeout_seconds: float = 15.0
    db_pool_max: int = 5
    log_format: str = "console"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidSettings("BILLING_MAX_ATTEMPTS must be at least 1")
        if self.backoff_base_seconds < 0 or self.backoff_max_seconds < 0:
            raise InvalidSettings("backoff seconds must not be negative")
        if self.hourly_charge_limit < 1 or self.decline_limit < 1:
            raise InvalidSettings("BILLING_HOURLY_CHARGE_LIMIT and BILLING_DECLINE_LIMIT must be "
                                  "at least 1")
        if self.delivery_limit < 1 or self.prefetch < 1 or self.max_concurrent_charges < 1:
            raise InvalidSettings("delivery limit, prefetch and concurrency must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BillingSettings:
        """Read ``BILLING_<FIELD>`` for every field; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"BILLING_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.name, raw, f.default)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def exchange(self) -> str:
        """The billing topic exchange shared with the dispatcher."""
        return f"{self.amqp_prefix}.billing"

    @property
    def queue(self) -> str:
        """This service's queue of ``balance.low`` and ``balance.depleted``."""
        return f"{self.amqp_prefix}.billing-service"

    @property
    def dead_queue(self) -> str:
        """Where undecodable events and events past the delivery limit are parked."""
        return f"{self.queue}.dead"


CHOICES = {"log_format": ("console", "json"),
           "log_level": ("debug", "info", "warning", "error", "critical")}


def _parse(name: str, raw: str, default: object) -> object:
    """Convert one environment value to the type of the field's default."""
    variable = f"BILLING_{name.upper()}"
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        kind = "a whole number" if isinstance(default, int) else "a number"
        raise InvalidSettings(f"{variable}={raw!r} is not accepted: use {kind}") from exc
    if name in CHOICES and raw.strip().lower() not in CHOICES[name]:
        raise InvalidSettings(f"{variable}={raw!r} is not accepted: use one of "
                              + ", ".join(CHOICES[name]))
    return raw.strip().lower() if name in CHOICES else raw.strip()
