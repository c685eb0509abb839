"""The metrics object: names, label sets, pre-created series, rendering and registry isolation."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.metrics import (
    CALLBACK_RESULTS,
    CODE_CLASSES,
    CREDIT_OPERATIONS,
    DEAD_LETTER_REASONS,
    HANDLER_ERROR_ACTIONS,
    KINDS,
    LISTENERS,
    LOOP_NAMES,
    LOW_BALANCE_TYPES,
    OUTCOMES,
    TOPUP_RESULTS,
    Metrics,
    kind_label,
    reason_label,
)

# family name (without _total) -> (type, label names)
EXPECTED = {
    "dispatcher_jobs": ("counter", {"kind", "outcome"}),
    "dispatcher_dead_letters": ("counter", {"reason"}),
    "dispatcher_reservation_seconds": ("histogram", set()),
    "dispatcher_send_seconds": ("histogram", {"kind"}),
    "dispatcher_queue_wait_seconds": ("histogram", set()),
    "dispatcher_record_seconds": ("histogram", set()),
    "dispatcher_send_slot_wait_seconds": ("histogram", set()),
    "dispatcher_end_to_end_seconds": ("histogram", {"kind"}),
    "dispatcher_credits": ("counter", {"operation"}),
    "dispatcher_paused_accounts": ("gauge", set()),
    "dispatcher_held_jobs": ("gauge", set()),
    "dispatcher_oldest_held_job_age_seconds": ("gauge", set()),
    "dispatcher_unknown_jobs": ("gauge", set()),
    "dispatcher_overdue_jobs": ("gauge", {"status"}),
    "dispatcher_outbox_backlog": ("gauge", set()),
    "dispatcher_outbox_lag_seconds": ("gauge", set()),
    "dispatcher_outbox_unroutable": ("gauge", set()),
    "dispatcher_outbox_returned": ("counter", set()),
    "dispatcher_consumers_attached": ("gauge", set()),
    "dispatcher_jobs_staged": ("counter", set()),
    "dispatcher_jobs_unstaged": ("counter", set()),
    "dispatcher_in_flight_jobs": ("gauge", set()),
    "dispatcher_low_balance_events": ("counter", {"type"}),
    "dispatcher_twilio_errors": ("counter", {"code_class"}),
    "dispatcher_status_callbacks": ("counter", {"result"}),
    "dispatcher_topups": ("counter", {"result"}),
    "dispatcher_listen_reconnects": ("counter", {"listener"}),
    "dispatcher_loop_failures": ("counter", {"loop"}),
    "dispatcher_handler_errors": ("counter", {"action"}),
}
FORBIDDEN_LABELS = {"account", "account_id", "phone", "to", "from", "recipient", "job_id", "sid"}


def _families(metrics: Metrics) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    body, _ = metrics.render()
    # prometheus_client also writes ``<name>_created`` timestamps, parsed as separate gauges.
    return {f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(body.decode())
            if not f.name.endswith("_created")}


def _value(metrics: Metrics, sample: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(sample, labels)
    assert value is not None, (sample, labels)
    return value


def test_every_metric_rendered_with_its_type_and_labels() -> None:
    families = _families(Metrics(CollectorRegistry()))
    assert set(families) == set(EXPECTED)
    for name, (kind, labels) in EXPECTED.items():
        ftype, samples = families[name]
        assert ftype == kind, name
        assert samples, f"{name} has no series before first use"
        seen = {key for _, sample_labels, _ in samples for key in sample_labels} - {"le"}
        assert seen == labels, name
        assert not seen & FORBIDDEN_LABELS


def test_render_is_prometheus_text_format() -> None:
    body, content_type = Metrics(CollectorRegistry()).render()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"# TYPE dispatcher_jobs_total counter" in body
    assert b'dispatcher_jobs_total{kind="sms",outcome="sent"} 0.0' in body


@pytest.mark.parametrize(("family", "label", "values"), [
    ("dispatcher_dead_letters_total", "reason", DEAD_LETTER_REASONS),
    ("dispatcher_credits_total", "operation", CREDIT_OPERATIONS),
    ("dispatcher_low_balance_events_total", "type", LOW_BALANCE_TYPES),
    ("dispatcher_twilio_errors_total", "code_class", CODE_CLASSES),
    ("dispatcher_status_callbacks_total", "result", CALLBACK_RESULTS),
    ("dispatcher_topups_total", "result", TOPUP_RESULTS),
    ("dispatcher_listen_reconnects_total", "listener", LISTENERS),
    ("dispatcher_loop_failures_total", "loop", LOOP_NAMES),
    ("dispatcher_handler_errors_total", "action", HANDLER_ERROR_ACTIONS),
])
def test_every_allowed_label_value_starts_at_zero(family: str, label: str,
                                                  values: tuple[str, ...]) -> None:
    metrics = Metrics(CollectorRegistry())
    for value in values:
        assert _value(metrics, family, **{label: value}) == 0


def test_jobs_series_for_every_kind_and_outcome() -> None:
    metrics = Metrics(CollectorRegistry())
    assert {"sms", "call", "broadcast", "cancel", "unknown"} == set(KINDS)
    for kind in KINDS:
        for outcome in OUTCOMES:
            assert _value(metrics, "dispatcher_jobs_total", kind=kind, outcome=outcome) == 0
        assert _value(metrics, "dispatcher_send_seconds_count", kind=kind) == 0


def test_observations_land_in_expected_buckets() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.reservation_seconds.observe(0.003)
    metrics.send_seconds.labels(kind="sms").observe(0.2)
    metrics.end_to_end_seconds.labels(kind="call").observe(7200)
    assert _value(metrics, "dispatcher_reservation_seconds_bucket", le="0.0025") == 0
    assert _value(metrics, "dispatcher_reservation_seconds_bucket", le="0.005") == 1
    assert _value(metrics, "dispatcher_send_seconds_bucket", kind="sms", le="0.25") == 1
    assert _value(metrics, "dispatcher_end_to_end_seconds_bucket", kind="call", le="3600.0") == 0
    assert _value(metrics, "dispatcher_end_to_end_seconds_bucket", kind="call", le="21600.0") == 1


def test_a_second_metrics_on_a_new_registry_is_independent() -> None:
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.jobs.labels(kind="sms", outcome="sent").inc(3)
    first.held_jobs.set(7)
    first.credits.labels(operation="reserved").inc(120)
    assert _value(first, "dispatcher_jobs_total", kind="sms", outcome="sent") == 3
    assert _value(second, "dispatcher_jobs_total", kind="sms", outcome="sent") == 0
    assert _value(second, "dispatcher_held_jobs") == 0
    assert _value(second, "dispatcher_credits_total", operation="reserved") == 0


def test_the_same_registry_cannot_hold_two() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry)


def test_label_helpers_fold_unknown_values() -> None:
    assert kind_label("call") == "call"
    assert kind_label("fax") == "unknown"
    assert kind_label(None) == "unknown"
    assert reason_label("not_json") == "not_json"
    assert reason_label("no_such_reason") == "handler_error"
