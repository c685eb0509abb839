"""Reading requests safely: bounded JSON bodies, pydantic validation, cursors, idempotency keys."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from dispatcher.api.errors import (
    IdempotencyKeyRequired,
    InvalidIdempotencyKey,
    InvalidJson,
    InvalidRequest,
    PayloadTooLarge,
)

MAX_JSON_BYTES = 1024 * 1024
"""Default body limit; a route may pass a larger one (a broadcast's recipients: 32 MiB)."""

_CHUNK = 64 * 1024
_IDEMPOTENCY_KEY = re.compile(r"^[!-~]{1,255}$")

Model = TypeVar("Model", bound=BaseModel)


async def read_body(request: web.Request, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The raw body, refused with 413 as soon as it exceeds ``max_bytes``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"the body is larger than {max_bytes} bytes", limit=max_bytes)
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the body is larger than {max_bytes} bytes", limit=max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Decode strict JSON (UTF-8, no NaN/Infinity); 400 ``invalid_json`` otherwise."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise invalid_json(exc.msg, exc.lineno, exc.colno) from exc
    except UnicodeDecodeError as exc:
        line, column = position(raw, exc.start)
        raise invalid_json("not UTF-8", line, column) from exc
    except RecursionError as exc:
        raise InvalidJson("the body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from exc


def invalid_json(reason: str, line: int, column: int) -> InvalidJson:
    """400 ``invalid_json`` saying where the body broke (1-based line and column)."""
    return InvalidJson(f"the body is not valid JSON: {reason} at line {line}, column {column}",
                       line=line, column=column)


def position(raw: bytes, offset: int) -> tuple[int, int]:
    """The 1-based (line, column) of a byte offset in a UTF-8 body."""
    before = raw[:offset]
    line_start = before.rfind(b"\n") + 1
    return before.count(b"\n") + 1, len(before[line_start:].decode("utf-8", "replace")) + 1


async def read_json(request: web.Request, model: type[Model],
                    max_bytes: int = MAX_JSON_BYTES) -> Model:
    """Read, decode and validate a JSON body."""
    return validate(model, parse_json(await read_body(request, max_bytes)), "body")


def validate(model: type[Model], data: Any, location: str) -> Model:
    """Validate ``data``; 422 ``invalid_request`` listing each failing field's path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = field_errors(exc, location)
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        where = f"{first['field']}: " if first["field"] else ""
        raise InvalidRequest(f"the request {location} is not valid: {where}"
                             f"{first['message']}{more}", errors=errors) from exc


def field_errors(exc: ValidationError, location: str) -> list[dict[str, str]]:
    """Pydantic errors as {location, field, message, type}; never echoes the input."""
    return [{"location": location, "field": ".".join(str(part) for part in error["loc"]),
             "message": error["msg"], "type": error["type"]}
            for error in exc.errors(include_url=False, include_input=False,
                                    include_context=False)]


def query(request: web.Request, model: type[Model]) -> Model:
    """Validate the query string (the first value of each parameter)."""
    params: dict[str, str] = {}
    for name, value in request.query.items():
        params.setdefault(name, value)
    return validate(model, params, "query")


def encode_cursor(position: str) -> str:
    """An opaque cursor for a position in a list."""
    return base64.urlsafe_b64encode(position.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, pattern: re.Pattern[str]) -> str | None:
    """The position a cursor stands for, or None when it is not one we issued."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return text if pattern.fullmatch(text) else None


def bad_cursor() -> InvalidRequest:
    """The error for a cursor this API did not issue."""
    return InvalidRequest("the cursor is not valid", errors=[{
        "location": "query", "field": "cursor", "message": "not a cursor this API issued",
        "type": "invalid_cursor"}])


def idempotency_key(request: web.Request) -> str:
    """The required ``Idempotency-Key`` header."""
    key = request.headers.get("Idempotency-Key")
    if key is None or key == "":
        raise IdempotencyKeyRequired()
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidIdempotencyKey()
    return key
