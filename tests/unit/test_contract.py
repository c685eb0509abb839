"""Job contract v1: valid jobs of every kind, every reason code, events, and the AsyncAPI doc."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from billing_client import events as billing
from dispatcher.jobs import contract
from dispatcher.jobs.contract import (
    REASON_CODES,
    ROUTING_KEYS,
    BroadcastJob,
    CallJob,
    CancelJob,
    DeadLetter,
    InvalidJob,
    OriginalMessage,
    SmsJob,
    StatusEvent,
    encode_job,
    parse_job,
    render_template,
    routing_key,
    template_variables,
    validate_job,
)
from dispatcher.metrics import DEAD_LETTER_REASONS

MG = "MG" + "0123456789abcdef" * 2
ASYNCAPI = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


def sms(**changes: Any) -> dict[str, Any]:
    job = {"schema_version": 1, "id": "job-1", "kind": "sms", "account": "acme",
           "from": "+14155550100", "to": "+14155552671", "body": "Your code is 493021"}
    return {**job, **changes}


def call(**changes: Any) -> dict[str, Any]:
    job = {"schema_version": 1, "id": "call-1", "kind": "call", "account": "acme",
           "from": "+14155550100", "to": "+14155552671", "twiml": "<Response/>",
           "max_minutes": 5}
    return {**job, **changes}


def broadcast(recipients: list[dict[str, Any]] | None = None, **changes: Any) -> dict[str, Any]:
    job = {"schema_version": 1, "id": "promo-1", "kind": "broadcast", "account": "acme",
           "messaging_service_sid": MG, "body": "Hi {name}",
           "recipients": [{"to": "+14155552671", "vars": {"name": "Ada"}}]
           if recipients is None else recipients}
    return {**job, **changes}


CANCEL = {"schema_version": 1, "id": "cancel-1", "kind": "cancel", "account": "acme",
          "target": "job-1"}


def raw(job: dict[str, Any]) -> bytes:
    return json.dumps(job).encode()


def rejected(data: bytes | dict[str, Any], **limits: int) -> InvalidJob:
    with pytest.raises(InvalidJob) as caught:
        parse_job(data if isinstance(data, bytes) else raw(data), **limits)
    return caught.value


# --- valid jobs -------------------------------------------------------------------------------

@pytest.mark.parametrize("job", [
    sms(), sms(**{"from": "ACME Shop"}), sms(priority="bulk", metadata={"order": "A-1"}),
    {k: v for k, v in sms(messaging_service_sid=MG).items() if k != "from"},
    sms(created_at="2026-11-22T09:30:00+01:00"),
])
def test_valid_sms(job: dict[str, Any]) -> None:
    parsed = parse_job(raw(job))
    assert isinstance(parsed, SmsJob)
    assert parsed.kind == "sms" and parsed.priority == job.get("priority", "transactional")
    assert parse_job(encode_job(parsed)) == parsed


@pytest.mark.parametrize("job", [call(), call(twiml=None, url="https://example.com/t.xml"),
                                 call(max_minutes=240, priority="bulk")])
def test_valid_call(job: dict[str, Any]) -> None:
    parsed = parse_job(raw({k: v for k, v in job.items() if v is not None}))
    assert isinstance(parsed, CallJob)
    assert parsed.from_ == "+14155550100"
    assert parse_job(encode_job(parsed)) == parsed


def test_valid_broadcast_renders_each_recipient() -> None:
    job = parse_job(raw(broadcast(
        [{"to": "+14155552671", "vars": {"name": "Ada"}},
         {"to": "+447700900123", "vars": {"name": "Alan", "unused": "x"}}],
        body="Hi {name}, {{literal}}", footer=True)))
    assert isinstance(job, BroadcastJob)
    assert job.priority == "bulk" and len(job.recipients) == 2
    assert job.render(job.recipients[1]) == "Hi Alan, {literal}\nReply STOP to unsubscribe"
    assert parse_job(encode_job(job)) == job


def test_broadcast_without_variables_needs_no_vars() -> None:
    job = parse_job(raw(broadcast([{"to": "+14155552671"}], body="Hello")))
    assert isinstance(job, BroadcastJob)
    assert job.render(job.recipients[0]) == "Hello"


def test_template_helpers() -> None:
    assert template_variables("{a} {b} {{c}} {a}") == {"a", "b"}
    assert render_template("{a}{{}}", {"a": "1"}) == "1{}"
    with pytest.raises(ValueError, match="unbalanced"):
        template_variables("Hi {name")


def test_routing_keys_cover_every_kind_and_priority() -> None:
    keys = {routing_key(parse_job(raw(job))) for job in (
        sms(), sms(priority="bulk"), call(), call(priority="bulk"), broadcast(),
        broadcast(priority="transactional"), CANCEL, {**CANCEL, "priority": "bulk"})}
    assert keys == set(ROUTING_KEYS)


def test_validate_job_takes_wire_form_dicts_and_models() -> None:
    job = validate_job(sms(created_at=datetime(2026, 1, 1, tzinfo=UTC)))
    assert validate_job(job) == job
    with pytest.raises(InvalidJob, match="from_: Extra inputs"):
        validate_job(sms(from_="+14155550100"))


def test_models_are_frozen() -> None:
    job = parse_job(raw(sms()))
    with pytest.raises(ValidationError):
        job.id = "changed"


# --- every reason code ------------------------------------------------------------------------

class ParseSpy:
    """Stands in for the job adapter and fails the test if anything gets parsed."""

    def validate_json(self, *_: object, **__: object) -> None:
        raise AssertionError("an oversized job was parsed")


def test_oversized_garbage_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contract, "_JOBS", ParseSpy())
    assert rejected(b"\x00garbage" * (300 * 1024 // 8)).reason == "too_large"
    big_sms = sms(body="x" * 1000, metadata={"pad": " " * 200})
    assert rejected(raw(big_sms), max_bytes=500).reason == "too_large"


def test_oversized_broadcast_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contract, "_JOBS", ParseSpy())
    error = rejected(raw(broadcast()), max_bytes=50, max_broadcast_bytes=100)
    assert error.reason == "too_large"
    assert error.job_id == "promo-1"  # sniffed from the raw bytes


def test_broadcast_may_exceed_the_job_limit_up_to_its_own() -> None:
    body = raw(broadcast())
    assert parse_job(body, max_bytes=50, max_broadcast_bytes=len(body)).kind == "broadcast"


def test_other_kinds_claiming_broadcast_are_still_held_to_the_job_limit() -> None:
    job = sms(metadata={"campaign": "broadcast"})  # contains the token "broadcast"
    error = rejected(raw(job), max_bytes=100)
    assert (error.reason, error.job_id, error.account) == ("too_large", "job-1", "acme")


def test_not_utf8_and_not_json() -> None:
    invalid = rejected(b'{"id": "job-7", "account": "acme", "body": "\xff\xfe"}')
    assert (invalid.reason, invalid.job_id, invalid.account) == ("not_utf8", "job-7", "acme")
    broken = rejected(b'{"id": "job-8", "kind": "sms",')
    assert (broken.reason, broken.job_id) == ("not_json", "job-8")
    assert rejected(b"").reason == "not_json"


@pytest.mark.parametrize(("job", "reason"), [
    (sms(schema_version=2), "unsupported_version"),
    (sms(schema_version=2, kind="fax"), "unsupported_version"),
    (sms(schema_version="1"), "unsupported_version"),
    (sms(schema_version=True), "unsupported_version"),
    (sms(kind="fax"), "unknown_kind"),
    ({k: v for k, v in sms().items() if k != "kind"}, "invalid_field"),
    ({k: v for k, v in sms().items() if k != "schema_version"}, "invalid_field"),
    (sms(extra="x"), "invalid_field"),
    (sms(messaging_service_sid=MG), "invalid_field"),
    ({k: v for k, v in sms().items() if k != "from"}, "invalid_field"),
    (sms(**{"from": "+44 20 7183"}), "invalid_field"),
    (sms(**{"from": "123456"}), "invalid_field"),
    (sms(**{"from": "ThisIsTooLong"}), "invalid_field"),
    (sms(messaging_service_sid="MG123", **{"from": None}), "invalid_field"),
    (sms(body=""), "invalid_field"),
    (sms(body="x" * 1601), "invalid_field"),
    (sms(priority="urgent"), "invalid_field"),
    (sms(id="has space"), "invalid_field"),
    (sms(id="x" * 129), "invalid_field"),
    (sms(account=""), "invalid_field"),
    (sms(metadata={f"k{i}": "v" for i in range(17)}), "invalid_field"),
    (sms(metadata={"k": 1}), "invalid_field"),
    (sms(created_at="2026-11-22T09:30:00"), "invalid_field"),
    (call(url="https://example.com/t.xml"), "invalid_field"),
    (call(twiml=None), "invalid_field"),
    (call(max_minutes=0), "invalid_field"),
    (call(max_minutes=241), "invalid_field"),
    (call(max_minutes=5.0), "invalid_field"),
    (call(max_minutes="5"), "invalid_field"),
    (call(**{"from": "ACME"}), "invalid_field"),
    (call(twiml=None, url="ftp://example.com/t.xml"), "invalid_field"),
    (broadcast(body="Hi {name"), "invalid_field"),
    (broadcast([{"to": "+14155552671", "vars": {}}]), "invalid_field"),
    (broadcast([{"to": "+14155552671", "extra": 1}], body="Hi"), "invalid_field"),
    (broadcast([]), "invalid_field"),
    (sms(to="0044207183875"), "invalid_recipient"),
    (sms(to="+1555"), "invalid_recipient"),
    (sms(to="+4401555"), "invalid_recipient"),
    (sms(to="+447700900123"), "invalid_recipient"),
    (sms(to="14155552671"), "invalid_recipient"),
    (call(to="+1 415 555 2671"), "invalid_recipient"),
    (broadcast([{"to": "+14155552671", "vars": {"name": "a"}},
                {"to": "07700900123", "vars": {"name": "b"}}]), "invalid_recipient"),
])
def test_reason_codes(job: dict[str, Any], reason: str) -> None:
    assert rejected(job).reason == reason


def test_not_an_object() -> None:
    assert len(REASON_CODES) == 9  # each one is reached by a test in this section
    assert rejected(b"[1, 2]").reason == "invalid_field"
    assert rejected(b'"sms"').job_id is None


SMS_START = b'{"schema_version": 1, "id": "job-9", "kind": "sms", "account": "acme", '
SMS_REST = b'"from": "+14155550100", "to": "+14155552671"'


@pytest.mark.parametrize("body", [
    rb'"a\u0000b"', rb'"\ud800"', rb'"x\udc00y"', rb'"\ud83d"', rb'"\ude00\ud83d"'])
def test_text_postgresql_cannot_store_is_invalid_text(body: bytes) -> None:
    error = rejected(SMS_START + SMS_REST + b', "body": ' + body + b"}")
    assert (error.reason, error.job_id, error.account) == ("invalid_text", "job-9", "acme")


@pytest.mark.parametrize("where", [
    b', "metadata": {"k\\u0000": "v"}', b', "metadata": {"k": "\\u0000"}'])
def test_nul_in_keys_and_nested_values_is_invalid_text(where: bytes) -> None:
    document = SMS_START + SMS_REST + b', "body": "hi"' + where + b"}"
    assert rejected(document).reason == "invalid_text"


def test_valid_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    job = parse_job(SMS_START + SMS_REST + rb', "body": "\ud83d\ude00 \\u0000"}')
    assert isinstance(job, SmsJob) and job.body == "\U0001f600 \\u0000"


@pytest.mark.parametrize(("document", "shown"), [
    # Another parser (first wins) saw account "acme"; last-wins would charge "other".
    (SMS_START + SMS_REST + b', "body": "hi", "account": "other"}', "'account'"),
    (SMS_START + SMS_REST + b', "body": "hi", "metadata": {"k": "1", "k": "2"}}', "a key"),
    (raw(broadcast()).replace(b'"vars": {', b'"vars": {"name": "x", ', 1), "a key"),
])
def test_duplicate_keys_at_any_depth_are_refused(document: bytes, shown: str) -> None:
    error = rejected(document)
    assert error.reason == "duplicate_key"
    assert error.detail == f"{shown} appears twice in one object"


def test_detail_names_fields_without_echoing_content() -> None:
    error = rejected(sms(to="0044207183875", body="secret " * 300))
    assert "to:" in error.detail and "body:" in error.detail
    assert "0044207183875" not in str(error) and "secret" not in str(error)
    assert error.reason == "invalid_field"  # not only the number is wrong
    many = rejected(broadcast([{"to": f"0{i}"} for i in range(10)], body="Hi"))
    assert many.reason == "invalid_recipient"
    assert "recipients[0].to" in many.detail and "and 5 more" in many.detail


def test_best_effort_ids_from_invalid_jobs() -> None:
    assert rejected(sms(body="")).job_id == "job-1"
    bad_id = rejected(sms(id="no spaces allowed", body=""))
    assert (bad_id.job_id, bad_id.account) == (None, "acme")
    assert rejected(b'{"account": 5, "id": "x"').account is None


def test_hundred_thousand_recipients_parse(capsys: pytest.CaptureFixture[str]) -> None:
    # Speed is the benchmarks' business (bench/); this only shows that a 100k list parses whole.
    count = 100_000
    recipients = [{"to": f"+1415555{i % 10000:04d}", "vars": {"name": f"n{i}"}}
                  for i in range(count)]
    body = raw(broadcast(recipients, body="Hi {name}, sale ends Sunday", footer=True))
    started = time.perf_counter()
    job = parse_job(body)
    elapsed = time.perf_counter() - started
    assert isinstance(job, BroadcastJob)
    assert len(job.recipients) == count
    with capsys.disabled():
        print(f"\n100k-recipient broadcast ({len(body) / 1e6:.1f} MB) parsed in "
              f"{elapsed * 1000:.0f} ms")


# --- status events and dead letters -----------------------------------------------------------

def status(**changes: Any) -> dict[str, Any]:
    event = {"schema_version": 1, "event_id": str(uuid.uuid4()), "job_id": "job-1",
             "account": "acme", "kind": "sms", "status": "delivered", "reason": None,
             "provider_sid": "SM" + "0" * 32, "broadcast_id": None, "segments": 2,
             "credits": 4, "metadata": {"order": "A-1"}, "occurred_at": "2026-11-22T09:30:00Z"}
    return {**event, **changes}


def test_status_event_round_trip_and_routing_key() -> None:
    event = StatusEvent.model_validate_json(raw(status()))
    assert event.routing_key == "status.sms.delivered"
    assert StatusEvent.model_validate_json(event.model_dump_json()) == event


def test_status_event_ignores_new_fields_but_checks_known_ones() -> None:
    assert StatusEvent.model_validate_json(raw(status(added_later="x"))).status == "delivered"
    with pytest.raises(ValidationError):
        StatusEvent.model_validate_json(raw(status(status="lost")))
    with pytest.raises(ValidationError):
        StatusEvent.model_validate_json(raw({k: v for k, v in status().items()
                                             if k != "event_id"}))


def test_dead_letter_headers_round_trip() -> None:
    error = rejected(sms(to="+1555"))
    letter = DeadLetter(reason=error.reason, detail=error.detail, job_id=error.job_id,
                        account=error.account)
    headers = letter.to_headers()
    assert headers["x-reason"] == "invalid_recipient" and headers["x-job-id"] == "job-1"
    original = OriginalMessage(message_id="job-1", routing_key="invalid_recipient",
                               type="sms", body_bytes=120)
    back = DeadLetter.from_headers({k: v.encode() for k, v in headers.items()}, original)
    assert back == letter.model_copy(update={"original": original})


def test_delivery_limit_dead_letter_has_only_its_routing_key() -> None:
    letter = DeadLetter.from_headers({"x-delivery-count": 5},
                                     OriginalMessage(routing_key="delivery_limit"))
    assert (letter.reason, letter.job_id) == ("delivery_limit", None)


# --- the AsyncAPI document cannot drift from the models ---------------------------------------

SCHEMA_MODELS: dict[str, tuple[type[BaseModel], str]] = {
    "SmsJob": (SmsJob, "validation"), "CallJob": (CallJob, "validation"),
    "BroadcastJob": (BroadcastJob, "validation"), "StatusEvent": (StatusEvent, "serialization"),
    "DeadLetter": (DeadLetter, "serialization"), "CancelJob": (CancelJob, "validation"),
    "BalanceLow": (billing.BalanceLow, "serialization"),
    "BalanceDepleted": (billing.BalanceDepleted, "serialization"),
    "CreditsGranted": (billing.CreditsGranted, "serialization"),
    "TopupFailed": (billing.TopupFailed, "serialization"),
    "TopupCapWarning": (billing.TopupCapWarning, "serialization"),
    "TopupCapped": (billing.TopupCapped, "serialization"),
    "TopupDisabled": (billing.TopupDisabled, "serialization"),
    "BalanceForecast": (billing.BalanceForecast, "serialization"),
    "DeclinedCharge": (billing.DeclinedCharge, "serialization"),
}


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    # JSON is YAML: the document is written in the JSON subset so no YAML library is needed.
    doc: dict[str, Any] = json.loads(ASYNCAPI.read_text(encoding="utf-8"))
    return doc


def examples(doc: dict[str, Any], message: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = doc["components"]["messages"][message]["examples"]
    assert found, f"{message} has no examples"
    return found


@pytest.mark.parametrize("message", ["SmsJob", "CallJob", "BroadcastJob", "CancelJob"])
def test_job_examples_are_valid_jobs(asyncapi: dict[str, Any], message: str) -> None:
    for example in examples(asyncapi, message):
        job = parse_job(raw(example["payload"]))
        assert type(job).__name__ == message, example["name"]


def test_job_channels_are_the_routing_keys(asyncapi: dict[str, Any]) -> None:
    channels = asyncapi["channels"]
    for key in ROUTING_KEYS:
        kind, priority = key.split(".")
        channel = channels[f"{kind}.{{priority}}"]
        assert priority in channel["parameters"]["priority"]["schema"]["enum"]
        message = channel["publish"]["message"]["$ref"].rsplit("/", 1)[1]
        assert message == {"sms": "SmsJob", "call": "CallJob", "broadcast": "BroadcastJob",
                           "cancel": "CancelJob"}[kind]
        for example in examples(asyncapi, message):
            assert parse_job(raw(example["payload"])).kind == kind


def test_status_examples_validate(asyncapi: dict[str, Any]) -> None:
    for example in examples(asyncapi, "StatusEvent"):
        event = StatusEvent.model_validate_json(raw(example["payload"]))
        assert event.routing_key.startswith(f"status.{event.kind}.")


def test_dead_letter_examples_match_what_the_parser_says(asyncapi: dict[str, Any]) -> None:
    for example in examples(asyncapi, "DeadLetter"):
        payload = example["payload"]
        body = payload.encode() if isinstance(payload, str) else raw(payload)
        letter = DeadLetter.from_headers(example["headers"],
                                         OriginalMessage(body_bytes=len(body)))
        if letter.reason in REASON_CODES:
            error = rejected(body)
            assert (error.reason, error.job_id, error.account) == (
                letter.reason, letter.job_id, letter.account), example["name"]
        else:  # refused by the dispatcher after the contract accepted it
            assert parse_job(body).id == letter.job_id, example["name"]


@pytest.mark.parametrize("message", ["BalanceLow", "BalanceDepleted", "CreditsGranted",
                                     "TopupFailed", "TopupCapWarning", "TopupCapped",
                                     "TopupDisabled"])
def test_billing_examples_decode(asyncapi: dict[str, Any], message: str) -> None:
    for example in examples(asyncapi, message):
        event = billing.decode_event(raw(example["payload"]))
        assert type(event).__name__ == message
        assert event.type in asyncapi["channels"]


@pytest.mark.parametrize("name", sorted(SCHEMA_MODELS))
def test_schemas_list_the_models_fields(asyncapi: dict[str, Any], name: str) -> None:
    model, mode = SCHEMA_MODELS[name]
    expected = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[arg-type]
    documented = asyncapi["components"]["schemas"][name]
    assert list(documented["properties"]) == list(expected["properties"])
    assert documented.get("required", []) == expected.get("required", [])


def test_every_message_has_a_channel(asyncapi: dict[str, Any]) -> None:
    used = {op["message"]["$ref"].rsplit("/", 1)[1] for channel in asyncapi["channels"].values()
            for op in (channel.get("publish"), channel.get("subscribe")) if op}
    assert used == set(asyncapi["components"]["messages"])
    assert asyncapi["asyncapi"].startswith("2.6")


def test_stored_payloads_skip_only_the_phone_number_check() -> None:
    # Well-formed E.164 that libphonenumber rejects: refused on the way in...
    job = {"schema_version": 1, "id": "stored-1", "kind": "sms", "account": "acme",
           "to": "+10005550100", "from": "+14155550199", "body": "hi"}
    raw = json.dumps(job).encode()
    with pytest.raises(InvalidJob) as refused:
        parse_job(raw)
    assert refused.value.reason == "invalid_recipient"
    # ...but a payload we stored was checked before it was stored, so it decodes as it is.
    stored = contract.decode_stored_job(raw)
    assert isinstance(stored, SmsJob) and stored.to == "+10005550100"
    # Everything else is still validated.
    with pytest.raises(InvalidJob):
        contract.decode_stored_job(json.dumps({**job, "body": ""}).encode())
    with pytest.raises(InvalidJob):
        contract.decode_stored_job(json.dumps({**job, "unknown_field": 1}).encode())


def test_dead_letter_reasons_are_documented(asyncapi: dict[str, Any]) -> None:
    message = asyncapi["components"]["messages"]["DeadLetter"]
    documented = message["headers"]["properties"]["x-reason"]["enum"]
    assert set(REASON_CODES) | {"job_id_conflict", "routing_mismatch"} <= set(documented)
    assert {"job_id_conflict", "routing_mismatch"} <= set(DEAD_LETTER_REASONS)
    for example in examples(asyncapi, "DeadLetter"):
        assert example["headers"]["x-reason"] in documented, example["name"]


def test_routing_mismatch_is_one_rule() -> None:
    job = parse_job(json.dumps({"schema_version": 1, "id": "r-1", "kind": "sms",
                                "account": "acme", "to": "+14155552671",
                                "from": "+14155550199", "body": "x",
                                "priority": "bulk"}).encode())
    assert contract.routing_mismatch(job, contract.Arrival("sms.bulk", "bulk")) is None
    assert contract.routing_mismatch(job, contract.Arrival(None, "bulk")) is None  # a retry
    for arrival in (contract.Arrival("sms.transactional", "transactional"),
                    contract.Arrival("call.bulk", "bulk"), contract.Arrival("#", "bulk"),
                    contract.Arrival(None, "transactional")):
        assert contract.routing_mismatch(job, arrival) is not None, arrival


@pytest.mark.parametrize(("to", "canonical"), [
    ("+4402071838750", "+442071838750"),  # refused before: libphonenumber calls it valid
    ("+9203001234567", "+923001234567"), ("+442071838750", "+442071838750"),
])
def test_a_trunk_prefix_after_the_country_code_is_dropped(to: str, canonical: str) -> None:
    job = parse_job(raw(sms(to=to)))
    assert isinstance(job, SmsJob) and job.to == canonical
    assert json.loads(encode_job(job))["to"] == canonical
