"""The sandbox's memory: credentials, the scenario in force, and every create it received.

Tests read it to count sends per recipient or per callback URL, and change the scenario
between (or during) requests; the control API exposes the same object as JSON.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Literal, get_args, get_type_hints

from dispatcher.sandbox.resources import is_delivery_error, new_sid

Kind = Literal["sms", "call"]
Action = Literal["accept", "refuse", "accept_then_500", "hang", "accept_then_hang"]
CALL_ENDINGS = ("completed", "busy", "no-answer", "failed", "canceled")


@dataclass(frozen=True)
class NumberRule:
    """How the sandbox treats creates to one recipient number."""

    error_code: int | None = None  # refuse with it; a 30xxx code is accepted, then undelivered
    http_status: int | None = None  # overrides the status Twilio uses for error_code
    fail_times: int | None = None  # misbehave for the first N creates only, then succeed
    accept_then_500: bool = False  # create the resource, fire callbacks, answer HTTP 500
    hang: bool = False  # never answer; nothing is created
    accept_then_hang: bool = False  # create the resource and fire callbacks; never answer
    call_duration_s: int | None = None  # reported call length (bounded by TimeLimit)
    call_status: str = "completed"  # a call's final status: completed, busy, no-answer, ...

    @property
    def misbehaves(self) -> bool:
        """True when this rule changes what the create answers or delivers."""
        return bool(self.error_code or self.accept_then_500 or self.hang
                    or self.accept_then_hang)


@dataclass(frozen=True)
class Scenario:
    """Failure injection and timing for the whole sandbox."""

    latency_ms: int = 0  # added to every create before it is processed
    callback_delay_ms: int = 0  # between successive status callbacks of one resource
    callbacks_enabled: bool = True  # False: statuses still progress, nothing is POSTed
    failure_rate: float = 0.0  # share of creates refused at random with failure_code
    failure_code: int = 20500
    seed: int | None = None
    default_call_duration_s: int = 5
    numbers: Mapping[str, NumberRule] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Scenario:
        """Build from the control API's JSON; unknown keys are an error."""
        raw = dict(data)
        numbers = {to: _rule_from_json(rule) for to, rule in (raw.pop("numbers", {})).items()}
        _check_fields(cls, raw)
        return cls(**raw, numbers=numbers)

    def to_json(self) -> dict[str, Any]:
        """The control API's JSON form."""
        data = asdict(self)
        data["numbers"] = {to: asdict(rule) for to, rule in self.numbers.items()}
        return data


def _rule_from_json(data: Mapping[str, Any]) -> NumberRule:
    _check_fields(NumberRule, data)
    rule = NumberRule(**data)
    if rule.call_status not in CALL_ENDINGS:
        raise ValueError(f"call_status must be one of {CALL_ENDINGS}")
    return rule


def _check_fields(cls: type[Any], data: Mapping[str, Any]) -> None:
    """Reject unknown keys and values of the wrong JSON type."""
    hints = get_type_hints(cls)
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    for key, value in data.items():
        allowed = get_args(hints[key]) or (hints[key],)
        if float in allowed:
            allowed = (*allowed, int)
        if not isinstance(value, allowed):
            raise ValueError(f"{cls.__name__}.{key} must be {hints[key]}")


@dataclass(frozen=True)
class Plan:
    """What the sandbox does with one create, decided from the scenario."""

    action: Action
    error_code: int | None = None  # the HTTP error when refusing
    http_status: int | None = None
    delivery_error: int | None = None  # reported in the final status callback


@dataclass
class CreateRecord:
    """One create request as received, and the resource it produced (if any)."""

    kind: Kind
    to: str
    from_: str | None
    body: str | None
    status_callback: str | None
    time_limit: int | None
    received_at: datetime
    outcome: str  # accepted, refused, accepted_then_500, hang, accepted_then_hang
    sid: str | None = None
    http_status: int | None = None
    error_code: int | None = None
    messaging_service_sid: str | None = None
    callback_events: tuple[str, ...] = ()
    status: str | None = None
    num_segments: int = 1
    duration: int | None = None
    date_updated: datetime | None = None
    date_sent: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    validity_period: int | None = None  # a message's ValidityPeriod, seconds, when given

    @property
    def accepted(self) -> bool:
        """True when a message or call resource was created."""
        return self.sid is not None

    def to_json(self) -> dict[str, Any]:
        """The control API's JSON form (dates in ISO 8601)."""
        data = asdict(self)
        data["from"] = data.pop("from_")
        data["callback_events"] = list(self.callback_events)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return data


@dataclass(frozen=True)
class CallbackRecord:
    """One status callback the sandbox tried to deliver."""

    sid: str
    url: str
    status: str
    attempts: int
    http_status: int | None  # None when the receiver could not be reached


class SandboxState:
    """Credentials, scenario and recorded creates, shared by the app and by tests."""

    def __init__(self, account_sid: str | None = None, auth_token: str | None = None,
                 scenario: Scenario | None = None) -> None:
        self.account_sid = account_sid or new_sid("AC")
        self.auth_token = auth_token or secrets.token_hex(16)
        self.records: list[CreateRecord] = []
        self.callbacks: list[CallbackRecord] = []
        self._by_sid: dict[str, CreateRecord] = {}
        self._hits: dict[str, int] = {}
        self.scenario = Scenario()
        self._rng = random.Random()
        self.set_scenario(scenario or Scenario())

    def set_scenario(self, scenario: Scenario) -> None:
        """Replace the scenario; per-number failure counters and the random seed restart."""
        self.scenario = scenario
        self._hits.clear()
        self._rng = random.Random(scenario.seed)

    def configure(self, **changes: Any) -> None:
        """Change some scenario fields, keeping the per-number counters (a new seed re-seeds)."""
        self.scenario = replace(self.scenario, **changes)
        if "seed" in changes:
            self._rng = random.Random(self.scenario.seed)

    def set_rule(self, to: str, rule: NumberRule | None) -> None:
        """Set (or with None, remove) the rule for one recipient; its counter restarts."""
        numbers = dict(self.scenario.numbers)
        if rule is None:
            numbers.pop(to, None)
        else:
            numbers[to] = rule
        self.scenario = replace(self.scenario, numbers=numbers)
        self._hits.pop(to, None)

    def reset(self) -> None:
        """Forget every create and callback and go back to the default scenario."""
        self.records.clear()
        self.callbacks.clear()
        self._by_sid.clear()
        self.set_scenario(Scenario())

    def decide(self, to: str) -> Plan:
        """Choose what to do with the next create to ``to``."""
        rule = self.scenario.numbers.get(to)
        if rule is not None and rule.misbehaves:
            hits = self._hits[to] = self._hits.get(to, 0) + 1
            if rule.fail_times is None or hits <= rule.fail_times:
                return _plan_for(rule)
        rate = self.scenario.failure_rate
        if rate > 0 and self._rng.random() < rate:
            return Plan("refuse", error_code=self.scenario.failure_code)
        return Plan("accept")

    def call_ending(self, to: str, time_limit: int | None) -> tuple[str, int]:
        """A call's final status and duration in seconds (bounded by its TimeLimit)."""
        rule = self.scenario.numbers.get(to)
        status = rule.call_status if rule else "completed"
        if status != "completed":
            return status, 0
        seconds = self.scenario.default_call_duration_s
        if rule is not None and rule.call_duration_s is not None:
            seconds = rule.call_duration_s
        return status, seconds if time_limit is None else min(seconds, time_limit)

    def add(self, record: CreateRecord) -> CreateRecord:
        """Record a create; give it a SID when it produced a resource."""
        if record.outcome not in ("refused", "hang"):
            record.sid = new_sid("SM" if record.kind == "sms" else "CA")
            record.status = "queued"
            record.date_updated = record.received_at
            self._by_sid[record.sid] = record
        self.records.append(record)
        return record

    def get(self, sid: str) -> CreateRecord | None:
        """The resource with this SID, if the sandbox created it."""
        return self._by_sid.get(sid)

    def creates(self, *, to: str | None = None, status_callback: str | None = None,
                kind: Kind | None = None, accepted: bool | None = None) -> list[CreateRecord]:
        """Recorded creates, oldest first, filtered by any of the given fields."""
        return [r for r in self.records
                if (to is None or r.to == to)
                and (status_callback is None or r.status_callback == status_callback)
                and (kind is None or r.kind == kind)
                and (accepted is None or r.accepted == accepted)]

    def count(self, **filters: Any) -> int:
        """How many creates match; the same filters as ``creates``."""
        return len(self.creates(**filters))


def _plan_for(rule: NumberRule) -> Plan:
    if rule.hang:
        return Plan("hang")
    if is_delivery_error(rule.error_code):
        return Plan("accept", delivery_error=rule.error_code)
    if rule.error_code:
        return Plan("refuse", error_code=rule.error_code, http_status=rule.http_status)
    if rule.accept_then_hang:
        return Plan("accept_then_hang")
    return Plan("accept_then_500")
