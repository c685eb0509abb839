"""JSON error responses with stable codes: ``{"error": {code, message, field, details}}``.

Handlers raise an ``ApiError`` (or a domain ``DispatcherError``, mapped here); the middleware
turns it, aiohttp's own HTTP errors and anything unexpected into that shape. Bad input never
becomes a 500.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from dispatcher.errors import DispatcherError

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API_PREFIXES = ("/v1/", "/twilio/inbound/")


class ApiError(DispatcherError):
    """The request failed."""

    status = 400
    code = "bad_request"


class Unauthenticated(ApiError):
    """A valid bearer token is required."""

    status, code = 401, "unauthenticated"


class Forbidden(ApiError):
    """This token's role may not do this."""

    status, code = 403, "forbidden"


class InvalidSignature(ApiError):
    """The X-Twilio-Signature header does not match the request."""

    status, code = 403, "invalid_signature"


class NotFound(ApiError):
    """Not found."""

    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    """This method is not allowed here."""

    status, code = 405, "method_not_allowed"


class InvalidJson(ApiError):
    """The request body is not valid JSON."""

    status, code = 400, "invalid_json"


class InvalidForm(ApiError):
    """The request body is not a valid application/x-www-form-urlencoded form."""

    status, code = 400, "invalid_form"


class IdempotencyKeyRequired(ApiError):
    """This request needs an Idempotency-Key header."""

    status, code = 400, "idempotency_key_required"


class InvalidIdempotencyKey(ApiError):
    """The Idempotency-Key must be 1 to 255 visible ASCII characters."""

    status, code = 400, "invalid_idempotency_key"


class IdempotencyConflict(ApiError):
    """This Idempotency-Key was already used for a different request."""

    status, code = 409, "idempotency_conflict"


class UnknownPurchase(ApiError):
    """This account has no refundable purchase with that reference."""

    status, code = 422, "unknown_purchase"


class PayloadTooLarge(ApiError):
    """The request body is too large."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    """This route takes application/x-www-form-urlencoded bodies only."""

    status, code = 415, "unsupported_media_type"


class InvalidRequest(ApiError):
    """The request is not valid."""

    status, code = 422, "invalid_request"


class ScheduleTooFar(ApiError):
    """send_at is further ahead than a schedule may be (35 days)."""

    status, code = 422, "schedule_too_far"

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, errors=[{"location": "body", "field": field,
                                           "message": message, "type": "schedule_too_far"}])


class NotCancelable(ApiError):
    """The job is no longer waiting for its time: it is being sent or done."""

    status, code = 409, "not_cancelable"


class InternalError(ApiError):
    """Internal error."""

    status, code = 500, "internal_error"


# Domain errors of the credit ledger: code -> (HTTP status, API code).
DOMAIN_ERRORS: dict[str, tuple[int, str]] = {
    "unknown_account": (404, "not_found"),
    "invalid_amount": (422, "invalid_request"),
    "invalid_grant": (422, "invalid_request"),
    "invalid_recipient": (422, "invalid_request"),
    "insufficient_credits": (409, "insufficient_credits"),
    "refund_too_large": (409, "refund_too_large"),
    "service_unavailable": (503, "service_unavailable"),
}

# aiohttp's own HTTP errors (routing, body size): status -> API error.
HTTP_ERRORS: dict[int, type[ApiError]] = {
    404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
}


def error_body(code: str, message: str, details: dict[str, object]) -> dict[str, object]:
    """The JSON body of every error response; ``field`` names the first field at fault."""
    return {"error": {"code": code, "message": message, "field": _first_field(details),
                      "details": details}}


def _first_field(details: dict[str, object]) -> str | None:
    errors = details.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        field = errors[0].get("field")
        return field if isinstance(field, str) and field else None
    return None


def error_response(exc: DispatcherError, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON response for an API or domain error."""
    if isinstance(exc, ApiError):
        status, code = exc.status, exc.code
    else:
        status, code = DOMAIN_ERRORS.get(exc.code, (500, "internal_error"))
    details = exc.details if status < 500 else {}
    message = str(exc) if status < 500 else "internal error"
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(error_body(code, message, dict(details)), status=status,
                             headers=headers or None)


def _from_http(exc: web.HTTPException) -> ApiError:
    kind = HTTP_ERRORS.get(exc.status)
    if kind is not None:
        error = kind()
        if isinstance(exc, web.HTTPMethodNotAllowed):
            error = kind(f"{exc.method} is not allowed here: use "
                         + ", ".join(sorted(exc.allowed_methods)),
                         allowed=sorted(exc.allowed_methods))
        return error
    error = ApiError(exc.reason)
    error.status, error.code = exc.status, exc.reason.lower().replace(" ", "_")
    return error


# Headers of aiohttp's own errors that the JSON error keeps (405 must say what is allowed).
KEPT_HEADERS = ("Allow",)


def _route_name(request: web.Request) -> str:
    """The route template (never the raw path, which may hold a phone number)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure under the API's prefixes becomes a JSON error with a stable code."""
    if not request.path.startswith(API_PREFIXES):
        return await handler(request)
    try:
        return await handler(request)
    except DispatcherError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {name: exc.headers[name] for name in KEPT_HEADERS if name in exc.headers}
        return error_response(_from_http(exc), kept)
    except Exception:
        log.exception("api_internal_error", route=_route_name(request), method=request.method)
        return error_response(InternalError())
