"""One rule for phone numbers: every entry point gives the same verdict and canonical form.

A number a job is refused for is never billed by a pre-flight, and the other way round; a number
written with the national trunk prefix after the country code (``+92 0…``) is the same recipient
as its canonical E.164 form for pricing, duplicates, opt-outs and sending.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from dispatcher.api.optouts import is_opted_out, record_opt_out, remove_opt_out
from dispatcher.broadcasts.preflight import Recipients
from dispatcher.broadcasts.runner import Broadcasts
from dispatcher.credits.rates import RateCache
from dispatcher.credits.subscriptions import create_account
from dispatcher.errors import InvalidRecipient
from dispatcher.jobs.contract import BroadcastJob, CallJob, InvalidJob, SmsJob, parse_job
from dispatcher.pricing.numbers import CountryResolver, canonical_number, country_of
from dispatcher.pricing.quotes import RateTable, sms_quote
from dispatcher.pricing.templates import Template


def toll_free(region: str) -> str:
    example = phonenumbers.example_number_for_type(region, PhoneNumberType.TOLL_FREE)
    assert example is not None, region
    return phonenumbers.format_number(example, PhoneNumberFormat.E164)


# (number, canonical form or None when it is not valid)
CASES: list[tuple[str, str | None]] = [
    *[(toll_free(r), toll_free(r)) for r in ("US", "GB", "DE", "FR", "AU", "JP", "IN", "BR")],
    ("+80012345678", "+80012345678"),  # international freephone (non-geographic)
    ("+989601", "+989601"),  # IR, 4 digits: refused as a job, billed by the pre-flight before
    ("+49301872446700847", "+49301872446700847"),  # DE fixed line of 17 digits (past 15)
    ("+9203001234567", "+923001234567"),  # trunk prefix 0 after the country code: PK mobile
    ("+4407911123456", "+447911123456"), ("+4402071838750", "+442071838750"),  # GB
    ("+330612345678", "+33612345678"),  # FR
    ("+112125550123", "+12125550123"),  # NANP trunk prefix 1
    ("+447400123456", "+447400123456"), ("+33612345678", "+33612345678"),  # mobile
    ("+442071838750", "+442071838750"), ("+14155552671", "+14155552671"),  # fixed
    ("+1415555267", None), ("+141555526711", None), ("+123", None),  # too short / long
    ("+4930187244670084712", None), ("+" + "4" * 31, None), ("+" + "4" * 40, None),
    ("+0123456789", None), ("+999123456789", None), ("+11235550123", None),  # invalid
    ("+447700900123", None), ("14155552671", None), ("+1 415 555 2671", None),  # not the form
    ("+\uff11\uff14\uff11\uff15\uff15\uff15\uff15\uff12\uff16\uff17\uff11", None),
]
NUMBERS = [number for number, _ in CASES]


def sms(to: str) -> dict[str, Any]:
    return {"schema_version": 1, "id": "n-1", "kind": "sms", "account": "acme", "to": to,
            "from": "+14155550199", "body": "hi"}


def job_verdict(job: dict[str, Any]) -> str | None:
    """The job's ``to`` as the contract accepted it, or None when it was refused for it."""
    try:
        parsed = parse_job(json.dumps(job).encode())
    except InvalidJob as exc:
        assert exc.reason == "invalid_recipient", exc.detail
        return None
    assert isinstance(parsed, SmsJob | CallJob)
    return parsed.to


def quote_verdict(number: str) -> str | None:
    try:
        return sms_quote(number, "hi", RateTable([("sms", "*", 1)])).country
    except InvalidRecipient:
        return None


@pytest.mark.parametrize(("number", "canonical"), CASES)
def test_every_pure_entry_point_applies_the_one_rule(number: str, canonical: str | None) -> None:
    try:
        parsed = phonenumbers.parse(number, None)
        libphonenumber = phonenumbers.is_valid_number(parsed)
    except phonenumbers.NumberParseException:
        libphonenumber = False
    if number.isascii() and number[1:].isdigit() and len(number) <= 32:
        assert (canonical is not None) == libphonenumber  # its length rules, not ours
    assert canonical_number(number) == canonical
    assert job_verdict(sms(number)) == canonical
    call = {**sms(number), "kind": "call", "twiml": "<Response/>", "max_minutes": 1}
    del call["body"]
    assert job_verdict(call) == canonical
    region = CountryResolver().resolve(number)
    assert (region is not None) == (canonical is not None)
    assert quote_verdict(number) == region
    if canonical is not None:
        assert country_of(number) == region == country_of(canonical)


def test_resolver_and_resolve_canonical_agree_with_the_rule_in_bulk() -> None:
    resolver = CountryResolver()
    expected = [canonical for _, canonical in CASES]
    for _ in range(2):  # cold, then from the memo
        regions, numbers = resolver.resolve_canonical(NUMBERS)
        assert [r is not None for r in regions] == [c is not None for c in expected]
        assert list(numbers) == [c or n for n, c in CASES]
        assert [r is not None for r in resolver.resolve_many(NUMBERS)] == [
            c is not None for c in expected]


async def test_pre_flight_broadcast_opt_outs_and_duplicates_follow_the_rule(
        pool: asyncpg.Pool) -> None:
    account = f"acct-{uuid.uuid4().hex[:10]}"
    await create_account(pool, account)
    broadcasts = Broadcasts(pool, RateCache(pool))
    template = Template("hi", False)
    # Each number alone: billable exactly when a job would be accepted.
    for number, canonical in CASES:
        result = await broadcasts.preflight(account, template, Recipients([number], [{}]))
        assert result.billable == (canonical is not None), number
        assert result.skipped["invalid"] == (canonical is None), number
        assert list(result.numbers) == [canonical or number]
    # A number and its canonical form are one recipient.
    valid = [(n, c) for n, c in CASES if c is not None]
    both = [form for n, c in valid for form in (c, n)]
    result = await broadcasts.preflight(account, template, Recipients(both, [{}] * len(both)))
    assert result.billable == len({c for _, c in valid})
    assert result.skipped["duplicate"] == len(both) - result.billable
    # Opt-outs: refused exactly for invalid numbers, stored and matched in canonical form.
    for number, canonical in CASES:
        if canonical is None:
            with pytest.raises(InvalidRecipient):
                await record_opt_out(pool, account, number, "api")
            continue
        assert await record_opt_out(pool, account, number, "api")
        assert await pool.fetchval("SELECT number FROM opt_outs WHERE account_id = $1 "
                                   "AND number = $2", account, canonical) == canonical
        assert await is_opted_out(pool, account, [number, canonical]) == {number, canonical}
        result = await broadcasts.preflight(account, template,
                                            Recipients([canonical, number], [{}, {}]))
        assert (result.billable, result.skipped["opted_out"]) == (0, 2)
        assert await remove_opt_out(pool, account, number)
    # A broadcast job accepts every number of the form; the pre-flight skips the invalid ones.
    in_form = [n for n in NUMBERS if n[:1] == "+" and n[1:].isascii() and n[1:].isdigit()
               and len(n) <= 32]
    job = parse_job(json.dumps({
        "schema_version": 1, "id": "b-1", "kind": "broadcast", "account": account,
        "from": "+14155550199", "body": "hi",
        "recipients": [{"to": n} for n in in_form]}).encode())
    assert isinstance(job, BroadcastJob)
    stored = await broadcasts.submit("b-1", job, refuse_if_short=False)
    assert stored[1] is True
    rows = await pool.fetch("SELECT to_number, status FROM broadcast_recipients "
                            "WHERE broadcast_id = 'b-1' ORDER BY seq")
    canonical_of = dict(CASES)
    for number, row in zip(in_form, rows, strict=True):
        canonical = canonical_of[number]
        assert row["to_number"] == (canonical or number)
        assert (row["status"] == "pending") == (canonical is not None
                                                and in_form.index(number) == min(
            i for i, n in enumerate(in_form) if canonical_of[n] == canonical))
