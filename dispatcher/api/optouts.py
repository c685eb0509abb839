"""The opt-out list: API routes, the Twilio inbound STOP/START/HELP webhook, and lookups.

``record_opt_out`` and ``is_opted_out`` are for the send path and the pre-flight too; the
latter answers for many numbers in one indexed query.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from xml.sax.saxutils import escape

import asyncpg
import structlog
from aiohttp import web
from multidict import MultiDict

from dispatcher.api.auth import principal
from dispatcher.api.errors import (
    InvalidForm,
    InvalidRequest,
    InvalidSignature,
    NotFound,
    UnsupportedMediaType,
)
from dispatcher.api.parsing import bad_cursor, decode_cursor, encode_cursor, query
from dispatcher.api.schemas import ACCOUNT_PATTERN, E164_PATTERN, OptOut, OptOutPage, PageQuery
from dispatcher.credits.ledger import Executor
from dispatcher.errors import InvalidRecipient, UnknownAccount
from dispatcher.pricing.numbers import canonical_number
from dispatcher.queries import q
from dispatcher.twilio.signatures import SignatureCheck, form_fields, last_values

log = structlog.get_logger(__name__)

_E164 = re.compile(E164_PATTERN)
_SOURCE = re.compile(r"[a-z_]{1,32}")
_ACCOUNT = re.compile(ACCOUNT_PATTERN)

FORM = "application/x-www-form-urlencoded"
Action = Literal["stop", "start", "help"]
# Twilio Advanced Opt-Out's default keywords; the whole message, trimmed, any case.
KEYWORDS: dict[str, Action] = {
    **dict.fromkeys(("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE",
                     "OPTOUT"), "stop"),
    **dict.fromkeys(("START", "YES", "UNSTOP"), "start"),
    **dict.fromkeys(("HELP", "INFO"), "help"),
}
REPLIES: dict[Action, str] = {
    "stop": "You have successfully been unsubscribed. You will not receive any more messages "
            "from this number. Reply START to resubscribe.",
    "start": "You have successfully been re-subscribed to messages from this number. "
             "Reply STOP to unsubscribe.",
    "help": "Reply STOP to unsubscribe, START to resubscribe. Msg & data rates may apply.",
}


def mask_number(number: str) -> str:
    """A phone number fit for logs: country prefix and last two digits only."""
    if len(number) <= 6:
        return "*" * len(number)
    return number[:3] + "*" * (len(number) - 5) + number[-2:]


def _check_number(number: str) -> str:
    """The canonical form of a valid number (the one rule); ``InvalidRecipient`` otherwise."""
    canonical = canonical_number(number)
    if canonical is None:
        raise InvalidRecipient("the number must be a valid E.164 number, e.g. +14155550100")
    return canonical


async def record_opt_out(db: Executor, account: str, number: str, source: str) -> bool:
    """Put ``number`` (stored in canonical E.164 form) on the account's opt-out list; True when
    it was not there yet."""
    if not _SOURCE.fullmatch(source):
        raise ValueError(f"opt-out source must match [a-z_]{{1,32}}, got {source!r}")
    row = await _add(db, account, _check_number(number), source)
    return bool(row["created"])


async def remove_opt_out(db: Executor, account: str, number: str) -> bool:
    """Take ``number`` (any form of it) off the account's opt-out list; True when it was on it."""
    stored = canonical_number(number) or number
    return await db.fetchrow(q("api_opt_out_remove"), account, stored) is not None


async def is_opted_out(db: Executor, account: str, numbers: list[str]) -> set[str]:
    """Which of ``numbers`` opted out of this account, whatever form each is written in (they
    are compared in canonical form): one query however many."""
    if not numbers:
        return set()
    canonical = {number: canonical_number(number) or number for number in numbers}
    rows = await db.fetch(q("api_opted_out_among"), account, sorted(set(canonical.values())))
    listed = {row["number"] for row in rows}
    return {number for number, form in canonical.items() if form in listed}


async def _add(db: Executor, account: str, number: str, source: str) -> Any:
    try:
        return await db.fetchrow(q("api_opt_out_add"), account, number, source)
    except asyncpg.ForeignKeyViolationError as exc:
        raise UnknownAccount(f"no account {account!r}", account_id=account) from exc


def _path_number(request: web.Request, *, strict: bool) -> str:
    """The ``{number}`` path parameter in canonical form (the one rule); unless ``strict``, a
    number that is not valid but has the form is taken as it is (an entry stored long ago)."""
    number = request.match_info["number"]
    canonical = canonical_number(number)
    if canonical is None and not strict and _E164.fullmatch(number):
        canonical = number
    if canonical is None:
        raise InvalidRequest("the number is not a valid E.164 phone number", errors=[{
            "location": "path", "field": "number", "message": "not a valid E.164 phone number",
            "type": "invalid_number"}])
    return canonical


def _entry(row: Any) -> OptOut:
    return OptOut(number=row["number"], source=row["source"], created_at=row["created_at"])


class OptOutsApi:
    """Handlers of ``/v1/accounts/{account}/opt-outs``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def list_opt_outs(self, request: web.Request) -> web.Response:
        page = query(request, PageQuery)
        after = ""
        if page.cursor:
            after = decode_cursor(page.cursor, _E164) or ""
            if not after:
                raise bad_cursor()
        rows = await self._pool.fetch(q("api_opt_out_page"), request.match_info["account"],
                                      after, page.limit + 1)
        entries = [_entry(row) for row in rows[:page.limit]]
        more = len(rows) > page.limit
        out = OptOutPage(opt_outs=entries,
                         next_cursor=encode_cursor(entries[-1].number) if more else None)
        return web.json_response(out.model_dump(mode="json"))

    async def put_opt_out(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        number = _path_number(request, strict=True)
        row = await _add(self._pool, account, number, "api")
        log.info("opt_out_added", account_id=account, number=mask_number(number),
                 token_id=principal(request).token_id, created=row["created"])
        return web.json_response(_entry(row).model_dump(mode="json"),
                                 status=201 if row["created"] else 200)

    async def delete_opt_out(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        number = _path_number(request, strict=False)
        removed = await remove_opt_out(self._pool, account, number)
        log.info("opt_out_removed", account_id=account, number=mask_number(number),
                 token_id=principal(request).token_id, removed=removed)
        return web.Response(status=204)


def keyword_action(body: str) -> Action | None:
    """The opt-out action a whole inbound message asks for, if it is a keyword."""
    return KEYWORDS.get(body.strip().upper())


async def _form(request: web.Request) -> MultiDict[str]:
    """The webhook's form fields, repeated names included (Twilio posts url-encoded forms)."""
    if request.content_type != FORM:
        raise UnsupportedMediaType()
    try:
        return form_fields(await request.post())
    except ValueError as exc:  # bad encoding
        raise InvalidForm() from exc


def twiml(message: str | None) -> web.Response:
    """A TwiML answer, replying ``message`` when given."""
    inner = f"<Message>{escape(message)}</Message>" if message else ""
    return web.Response(text=f'<?xml version="1.0" encoding="UTF-8"?><Response>{inner}</Response>',
                        content_type="text/xml")


class InboundWebhook:
    """``POST /twilio/inbound/{account}``: STOP/START/HELP keywords from recipients."""

    def __init__(self, pool: asyncpg.Pool, auth_token: str, public_base_url: str) -> None:
        self._pool = pool
        self._signature = SignatureCheck(auth_token, public_base_url)

    async def handle(self, request: web.Request) -> web.Response:
        form = await _form(request)
        if not self._signature.valid_request(request, form):
            log.warning("inbound_forged", route="/twilio/inbound/{account}")
            raise InvalidSignature()
        params = last_values(form)
        account = request.match_info["account"]
        if not _ACCOUNT.fullmatch(account):
            raise NotFound(f"no account {account!r}")
        action = keyword_action(params.get("Body", ""))
        sender = canonical_number(params.get("From", ""))
        if action is None or sender is None:
            return twiml(None)
        if not await self._pool.fetchval(q("api_account_exists"), account):
            raise NotFound(f"no account {account!r}")
        await self._apply(account, action, sender)
        return twiml(REPLIES[action])

    async def _apply(self, account: str, action: Action, sender: str) -> None:
        changed = False
        if action == "stop":
            changed = await record_opt_out(self._pool, account, sender, "inbound")
        elif action == "start":
            changed = await remove_opt_out(self._pool, account, sender)
        log.info("inbound_keyword", account_id=account, action=action,
                 number=mask_number(sender), changed=changed)
