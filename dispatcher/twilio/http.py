"""An async HTTP client for the official twilio library: our timeout, no retries, any base URL.

Used as ``twilio.rest.Client(sid, token, http_client=SandboxAwareHttpClient(base_url=...))``.
With a base URL, requests to ``*.twilio.com`` go there instead (our sandbox); without one they
go to Twilio. The library's own ``AsyncTwilioHttpClient`` ignores its ``timeout`` (twilio-python
#925: it only forwards the per-request timeout, which the resource methods never pass) and its
``max_retries`` retries every 5xx, creates included — so this client bounds every request with
its own deadline and never retries: a retried create can send twice.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from collections.abc import Iterable, Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
from twilio.http import AsyncHttpClient
from twilio.http.response import Response

log = structlog.get_logger(__name__)
_stdlib_logger = logging.getLogger("dispatcher.twilio.http")
DEFAULT_TIMEOUT_SECONDS = 10.0
# Every request runs under our own ``asyncio.timeout``, so aiohttp keeps no timers of its own.
NO_AIOHTTP_TIMEOUT = aiohttp.ClientTimeout()
# The library sets Accept, Content-Type and User-Agent; compressing small JSON answers costs more
# than it saves.
SKIPPED_AUTO_HEADERS = ("Accept-Encoding",)


@functools.lru_cache(maxsize=256)
def rewrite_url(url: str, base_url: str) -> str:
    """Point a ``*.twilio.com`` URL at ``base_url`` (keeping path and query); others unchanged."""
    if not base_url:
        return url
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host != "twilio.com" and not host.endswith(".twilio.com"):
        return url
    base = urlsplit(base_url)
    path = base.path.rstrip("/") + parts.path
    return urlunsplit((base.scheme, base.netloc, path, parts.query, parts.fragment))


@functools.lru_cache(maxsize=8)
def basic_auth(username: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value (aiohttp's BasicAuth is deprecated)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def form_pairs(data: Mapping[str, object] | None) -> list[tuple[str, str]]:
    """Twilio's form parameters as ordered pairs; list values become repeated keys."""
    pairs: list[tuple[str, str]] = []
    for key, value in (data or {}).items():
        values: Iterable[object] = value if isinstance(value, list | tuple) else (value,)
        pairs.extend((key, str(item)) for item in values if item is not None)
    return pairs


def form_body(data: Mapping[str, object]) -> bytes:
    """Twilio's form parameters as an ``application/x-www-form-urlencoded`` body."""
    return urlencode(form_pairs(data)).encode("ascii")


class SandboxAwareHttpClient(AsyncHttpClient):  # type: ignore[misc]
    """twilio's async HTTP client contract over one aiohttp session, bounded, never retrying."""

    def __init__(self, base_url: str = "", timeout: float = DEFAULT_TIMEOUT_SECONDS,
                 pool_limit: int = 100) -> None:
        super().__init__(_stdlib_logger, True, timeout)
        self.base_url = base_url.rstrip("/")
        self._pool_limit = pool_limit
        self._session: aiohttp.ClientSession | None = None

    def _client_session(self) -> aiohttp.ClientSession:
        """The one session of this client, opened on first use (inside the event loop)."""
        if self._session is None or self._session.closed:
            # Twilio's API sets no cookies worth keeping: a dummy jar skips per-response parsing.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_limit),
                cookie_jar=aiohttp.DummyCookieJar(), timeout=NO_AIOHTTP_TIMEOUT,
                skip_auto_headers=SKIPPED_AUTO_HEADERS)
        return self._session

    async def request(  # the signature twilio's clients call
        self, method: str, url: str, params: Mapping[str, object] | None = None,
        data: Mapping[str, object] | None = None, headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        allow_redirects: bool = False,
    ) -> Response:
        """Send one request, once, within the timeout; raises TimeoutError when it runs out."""
        limit = self._deadline(timeout)
        target = rewrite_url(url, self.base_url)
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                response = await self._send(method, target, params, data, headers, auth,
                                            allow_redirects)
        except TimeoutError:
            log.warning("twilio_request_timeout", method=method.upper(),
                        path=urlsplit(target).path, timeout_s=limit)
            raise
        if log.is_enabled_for(logging.DEBUG):
            log.debug("twilio_request", method=method.upper(), path=urlsplit(target).path,
                      http_status=response.status_code,
                      elapsed_ms=round((time.monotonic() - started) * 1000, 1))
        return response

    def _deadline(self, timeout: float | None) -> float:
        """The per-request timeout if given, never longer than the client's own."""
        if timeout is not None and timeout <= 0:
            raise ValueError(timeout)
        own = float(self.timeout or DEFAULT_TIMEOUT_SECONDS)
        return own if timeout is None else min(own, timeout)

    async def _send(self, method: str, url: str, params: Mapping[str, object] | None,
                    data: Mapping[str, object] | None, headers: Mapping[str, str] | None,
                    auth: tuple[str, str] | None, allow_redirects: bool) -> Response:
        all_headers = dict(headers or {})
        if auth:
            all_headers["Authorization"] = basic_auth(*auth)
        if data:
            all_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        async with self._client_session().request(
            method.upper(), url, params=form_pairs(params) or None,
            data=form_body(data) if data else None, headers=all_headers,
            allow_redirects=allow_redirects,
        ) as raw:
            body = await raw.read()
            return Response(raw.status, body.decode(raw.charset or "utf-8"), raw.headers)

    async def close(self) -> None:
        """Close the HTTP session; the client opens a new one if used again."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> SandboxAwareHttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
