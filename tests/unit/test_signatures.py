"""Our own signing and checking of status callbacks agree with twilio's RequestValidator."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from dispatcher.sandbox.callbacks import form_body, sign
from dispatcher.twilio.callbacks import job_report
from dispatcher.twilio.signatures import SignatureCheck

TOKEN = "the-auth-token"
BASE = "http://127.0.0.1:8080"
FORMS = [
    {},
    {"MessageSid": "SM123", "MessageStatus": "delivered", "To": "+14155550100",
     "NumSegments": "2", "ApiVersion": "2010-04-01"},
    {"CallSid": "CA1", "CallStatus": "completed", "Caller": "", "Timestamp":
     "Tue, 01 Dec 2026 22:00:00 +0000", "Body": "café & tea = 100% ✓"},
]


@pytest.mark.parametrize("params", FORMS)
def test_the_sandbox_signs_and_encodes_as_twilio_does(params: dict[str, str]) -> None:
    url = f"{BASE}/twilio/status/job-1"
    assert sign(TOKEN.encode(), url, params) == RequestValidator(TOKEN).compute_signature(
        url, params)
    assert form_body(params).decode() == urlencode(params)


@pytest.mark.parametrize("params", FORMS)
@pytest.mark.parametrize("signed_url", [f"{BASE}/twilio/status/job-1",
                                        "http://127.0.0.1/twilio/status/job-1"])
def test_signature_check_accepts_what_request_validator_accepts(
        params: dict[str, str], signed_url: str) -> None:
    check = SignatureCheck(TOKEN, BASE)
    signature = RequestValidator(TOKEN).compute_signature(signed_url, params)
    assert check.valid("/twilio/status/job-1", params, signature)
    assert not check.valid("/twilio/status/job-2", params, signature)
    assert not check.valid("/twilio/status/job-1", {**params, "Extra": "1"}, signature)
    forged = RequestValidator("another-token").compute_signature(signed_url, params)
    assert not check.valid("/twilio/status/job-1", params, forged)
    assert not check.valid("/twilio/status/job-1", params, "")


@pytest.mark.parametrize("path", ["/twilio/status/a;b", "/twilio/status/a?x=1",
                                  "/twilio/status/a#f", "/twilio/status/a\tb"])
def test_urls_that_urlparse_rewrites_are_left_to_request_validator(path: str) -> None:
    validator = RequestValidator(TOKEN)
    check = SignatureCheck(TOKEN, BASE)
    params = {"MessageStatus": "sent"}
    for url in (BASE + path, (BASE + path).replace("\t", "")):
        signature = validator.compute_signature(url, params)
        assert check.valid(path, params, signature) == validator.validate(
            BASE + path, params, signature)


def test_a_callback_report_is_a_message_or_a_call_never_both() -> None:
    sms = job_report("j", {"MessageSid": "SM1", "MessageStatus": "delivered",
                           "NumSegments": "3"})
    assert sms is not None and (sms.kind, sms.status, sms.settle, sms.units) == (
        "sms", "delivered", True, 3)
    call = job_report("j", {"CallSid": "CA1", "CallStatus": "completed", "CallDuration": "61"})
    assert call is not None and (call.kind, call.status, call.units) == ("call", "delivered", 2)
    assert job_report("j", {"MessageStatus": "sent", "CallStatus": "ringing"}) is None
    assert job_report("j", {"MessageStatus": "teleported"}) is None


@pytest.mark.parametrize("path", ["/twilio/inbound/acme?q=a%20b+c", "/twilio/status/j?n=%2Fx",
                                  "/twilio/status/j?c=S%C3%A3o&c=Rio", "/twilio/status/j?",
                                  "/twilio/status/j?a=1;b=2", "/twilio/status/j"])
@pytest.mark.parametrize("base", [BASE, "https://hooks.example.com/p%20q",
                                  "https://hooks.example.com:443/d"])
def test_the_fast_path_accepts_exactly_what_request_validator_accepts(
        path: str, base: str) -> None:
    validator = RequestValidator(TOKEN)
    check = SignatureCheck(TOKEN, base)
    form = MultiDict([("To", "+14155550100"), ("Tag", "b"), ("Tag", "a"), ("Tag", "b")])
    url = base + path
    for signed_url, params in [(url, form), (url, MultiDict([("To", "+14155550100")])),
                               (url.replace(":443", ""), form), (url + "&x", form)]:
        signature = validator.compute_signature(signed_url, params)
        assert check.valid(path, form, signature) == validator.validate(url, form, signature)
    # What Twilio signed is accepted, except where twilio's own validator refuses it too
    # (``urlparse`` drops an empty query, so a URL ending in '?' never validates).
    genuine = check.valid(path, form, validator.compute_signature(url, form))
    assert genuine == (not path.endswith("?"))
