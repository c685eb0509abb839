"""Every Prometheus metric the dispatcher exports, held by one object built on a given registry.

Labels come only from the small fixed sets below (never an account, phone number or job id), and
every labelled series is created at zero up front so dashboards and alert rules see it at once.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Kind = Literal["sms", "call", "broadcast", "cancel", "unknown"]
Outcome = Literal["consumed", "sent", "failed", "held", "expired", "dead_lettered", "unknown",
                  "duplicate", "released", "retried", "scheduled", "deferred", "canceled"]
DeadLetterReason = Literal["too_large", "not_json", "not_utf8", "unsupported_version",
                           "unknown_kind", "unsupported_kind", "invalid_field",
                           "invalid_recipient", "unknown_account", "job_id_conflict",
                           "routing_mismatch", "delivery_limit", "handler_error", "invalid_text",
                           "duplicate_key", "schedule_too_far",
                           "country_not_allowed", "price_above_limit"]
CreditOperation = Literal["reserved", "captured", "released", "granted", "forfeited"]
LowBalanceType = Literal["balance_low", "balance_depleted"]
CodeClass = Literal["4xx", "429", "5xx", "timeout", "network"]
CallbackResult = Literal["accepted", "forged", "ignored"]
TopupResult = Literal["applied", "duplicate", "rejected"]
Listener = Literal["resumer", "outbox"]
OverdueState = Literal["sending", "retry_wait", "unknown"]
HandlerErrorAction = Literal["waited_for_database", "retried", "dead_lettered"]
LoopName = Literal["broadcast_runner", "outbox_relay", "resumer", "hold_sweeper", "reconciler",
                   "credit_flow", "retry_sweeper", "expiry_sweeper",
                   "releaser"]

KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)
DEAD_LETTER_REASONS: Final[tuple[DeadLetterReason, ...]] = get_args(DeadLetterReason)
CREDIT_OPERATIONS: Final[tuple[CreditOperation, ...]] = get_args(CreditOperation)
LOW_BALANCE_TYPES: Final[tuple[LowBalanceType, ...]] = get_args(LowBalanceType)
CODE_CLASSES: Final[tuple[CodeClass, ...]] = get_args(CodeClass)
CALLBACK_RESULTS: Final[tuple[CallbackResult, ...]] = get_args(CallbackResult)
TOPUP_RESULTS: Final[tuple[TopupResult, ...]] = get_args(TopupResult)
LISTENERS: Final[tuple[Listener, ...]] = get_args(Listener)
OVERDUE_STATES: Final[tuple[OverdueState, ...]] = get_args(OverdueState)
HANDLER_ERROR_ACTIONS: Final[tuple[HandlerErrorAction, ...]] = get_args(HandlerErrorAction)
LOOP_NAMES: Final[tuple[LoopName, ...]] = get_args(LoopName)

# The classic text format every Prometheus version scrapes; ``generate_latest`` writes exactly
# this (prometheus_client's own ``CONTENT_TYPE_LATEST`` now announces 1.0.0, which older servers
# and some proxies do not know).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Database round trips and provider calls: a millisecond up to the 10 s provider timeout.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0)
# Publish to provider acceptance: milliseconds normally, hours for a job held by a paused account.
END_TO_END_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                             300.0, 1800.0, 3600.0, 21600.0, 86400.0)


def kind_label(kind: str | None) -> Kind:
    """The ``kind`` label for any job kind string; anything unrecognised is ``unknown``."""
    for known in KINDS:
        if kind == known:
            return known
    return "unknown"


def reason_label(reason: str | None) -> DeadLetterReason:
    """The ``reason`` label for a dead-letter reason code; unlisted codes are ``handler_error``."""
    for known in DEAD_LETTER_REASONS:
        if reason == known:
            return known
    return "handler_error"


class Metrics:
    """The dispatcher's metrics, registered on ``registry`` (one per process, or per test)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.jobs = Counter("dispatcher_jobs_total", "Jobs by kind and what happened to them.",
                            ["kind", "outcome"], registry=registry)
        self.dead_letters = Counter("dispatcher_dead_letters_total",
                                    "Jobs rejected to the dead-letter queue, by reason code.",
                                    ["reason"], registry=registry)
        self.reservation_seconds = Histogram(
            "dispatcher_reservation_seconds", "Time to reserve credits for one job in PostgreSQL.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.send_seconds = Histogram("dispatcher_send_seconds",
                                      "Duration of one provider create call, whatever its result.",
                                      ["kind"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait_seconds = Histogram(
            "dispatcher_queue_wait_seconds",
            "From delivery by RabbitMQ to a worker taking the job (prefetched, waiting).",
            buckets=LATENCY_BUCKETS, registry=registry)
        # Fair share (dispatch.fairness): deliveries of accounts past their share, staged in
        # PostgreSQL and claimed back in turn.
        self.jobs_staged = Counter("dispatcher_jobs_staged_total",
                                   "Deliveries staged in PostgreSQL behind their account's "
                                   "backlog.", registry=registry)
        self.jobs_unstaged = Counter("dispatcher_jobs_unstaged_total",
                                     "Staged deliveries claimed back for their turn.",
                                     registry=registry)
        self.send_slot_wait_seconds = Histogram(
            "dispatcher_send_slot_wait_seconds",
            "Wait of a reserved job for one of the max_in_flight provider-call slots.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.record_seconds = Histogram(
            "dispatcher_record_seconds",
            "From provider acceptance to the job's `sent` state committed in PostgreSQL.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.end_to_end_seconds = Histogram(
            "dispatcher_end_to_end_seconds", "From the job's publish time to provider acceptance.",
            ["kind"], buckets=END_TO_END_BUCKETS, registry=registry)
        # Sampled from the ledger (credits/flow.py): database-wide, aggregate replicas with max.
        self.credits = Counter("dispatcher_credits_total",
                               "Credits moved, by ledger operation (database-wide).",
                               ["operation"], registry=registry)
        self._init_gauges(registry)
        self.low_balance_events = Counter("dispatcher_low_balance_events_total",
                                          "balance.low and balance.depleted events relayed.",
                                          ["type"], registry=registry)
        self.twilio_errors = Counter("dispatcher_twilio_errors_total",
                                     "Provider calls that did not succeed, by error class.",
                                     ["code_class"], registry=registry)
        self.status_callbacks = Counter("dispatcher_status_callbacks_total",
                                        "Twilio status callbacks received, by result.",
                                        ["result"], registry=registry)
        self.topups = Counter("dispatcher_topups_total",
                              "credits.granted events received, by result.",
                              ["result"], registry=registry)
        self.outbox_returned = Counter(
            "dispatcher_outbox_returned_total",
            "Publishes of billing events the broker returned unroutable (each retry counts).",
            registry=registry)
        self.listen_reconnects = Counter(
            "dispatcher_listen_reconnects_total",
            "LISTEN connections re-established after being lost, by listener.",
            ["listener"], registry=registry)
        self.loop_failures = Counter(
            "dispatcher_loop_failures_total",
            "Background loop passes that failed on an outage (database or broker) and were "
            "retried after a backoff, by loop.", ["loop"], registry=registry)
        self.handler_errors = Counter(
            "dispatcher_handler_errors_total",
            "Jobs whose handling failed unexpectedly, by what was done: waited for the "
            "database, retried after a delay, or dead-lettered at the delivery limit.",
            ["action"], registry=registry)
        self._create_series()

    def _init_gauges(self, registry: CollectorRegistry) -> None:
        """Gauges; database-wide ones are the same on every replica (aggregate with ``max``)."""
        self.paused_accounts = Gauge("dispatcher_paused_accounts",
                                     "Accounts paused for lack of credits.", registry=registry)
        self.held_jobs = Gauge("dispatcher_held_jobs", "Jobs held for paused accounts.",
                               registry=registry)
        self.oldest_held_job_age_seconds = Gauge("dispatcher_oldest_held_job_age_seconds",
                                                 "Age of the oldest held job (0 when none).",
                                                 registry=registry)
        self.unknown_jobs = Gauge("dispatcher_unknown_jobs",
                                  "Jobs whose send outcome is unknown and still unresolved.",
                                  registry=registry)
        self.overdue_jobs = Gauge(
            "dispatcher_overdue_jobs",
            "Unfinished jobs past the reconcile grace in their state: sending (since the send "
            "began), retry_wait (since due), unknown.", ["status"], registry=registry)
        self.outbox_backlog = Gauge("dispatcher_outbox_backlog",
                                    "Outbox events not yet relayed to RabbitMQ.",
                                    registry=registry)
        self.outbox_lag_seconds = Gauge("dispatcher_outbox_lag_seconds",
                                        "Age of the oldest unrelayed outbox event (0 when none).",
                                        registry=registry)
        self.outbox_unroutable = Gauge(
            "dispatcher_outbox_unroutable",
            "Billing events the broker returned (no queue bound) that still wait for a queue.",
            registry=registry)
        self.consumers_attached = Gauge("dispatcher_consumers_attached",
                                        "Queue consumers this process has attached.",
                                        registry=registry)
        self.in_flight = Gauge("dispatcher_in_flight_jobs", "Jobs this process is handling now.",
                               registry=registry)

    def _create_series(self) -> None:
        """Create every labelled series at zero, so rates and alerts see them from the start."""
        for kind in KINDS:
            for outcome in OUTCOMES:
                self.jobs.labels(kind=kind, outcome=outcome)
            self.send_seconds.labels(kind=kind)
            self.end_to_end_seconds.labels(kind=kind)
        for counter, label, values in (
            (self.dead_letters, "reason", DEAD_LETTER_REASONS),
            (self.credits, "operation", CREDIT_OPERATIONS),
            (self.low_balance_events, "type", LOW_BALANCE_TYPES),
            (self.twilio_errors, "code_class", CODE_CLASSES),
            (self.status_callbacks, "result", CALLBACK_RESULTS),
            (self.topups, "result", TOPUP_RESULTS),
            (self.listen_reconnects, "listener", LISTENERS),
            (self.overdue_jobs, "status", OVERDUE_STATES),
            (self.loop_failures, "loop", LOOP_NAMES),
            (self.handler_errors, "action", HANDLER_ERROR_ACTIONS),
        ):
            for value in values:
                counter.labels(**{label: value})

    def render(self) -> tuple[bytes, str]:
        """The text exposition of this registry and its content type, for ``/metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE
