"""A lean HTTP/1.1 client for the sandbox's status callbacks: one form POST, kept-alive sockets.

The sandbox posts hundreds of thousands of callbacks in a benchmark, and a general client's
per-request machinery would cost more CPU than the receiver spends on them. This writes one
pre-built request on a kept-alive connection and reads the status line, the headers and a
``Content-Length`` or chunked body; anything else (https, say) goes through aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import aiohttp

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class PostFailed(Exception):
    """The receiver could not be reached or answered something that is not HTTP/1.1."""


class FormPoster:
    """POSTs ``application/x-www-form-urlencoded`` bodies; returns the HTTP status."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float,
                 max_idle_per_host: int = 128) -> None:
        self._session = session
        self._timeout = timeout
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int], list[Connection]] = {}

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """Send the form; raises PostFailed (or TimeoutError) when no answer came."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            try:
                async with self._session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    return response.status
            except aiohttp.ClientError as exc:
                raise PostFailed(type(exc).__name__) from exc
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}",
                 f"Content-Length: {len(body)}",
                 *(f"{name}: {value}" for name, value in headers.items()), "", ""]
        request = "\r\n".join(lines).encode("latin-1") + body
        key = (parts.hostname, parts.port or 80)
        async with asyncio.timeout(self._timeout):
            return await self._exchange(key, request)

    async def close(self) -> None:
        """Close every idle connection."""
        for connections in self._idle.values():
            for _, writer in connections:
                writer.close()
        self._idle.clear()

    async def _exchange(self, key: tuple[str, int], request: bytes) -> int:
        idle = self._idle.setdefault(key, [])
        while idle:  # a kept-alive socket the receiver may have closed meanwhile
            connection = idle.pop()
            answer = await self._try(connection, request, reused=True)
            if answer is not None:
                return self._keep(key, connection, *answer)
        try:
            connection = await asyncio.open_connection(*key)
        except OSError as exc:
            raise PostFailed(type(exc).__name__) from exc
        answer = await self._try(connection, request, reused=False)
        assert answer is not None
        return self._keep(key, connection, *answer)

    async def _try(self, connection: Connection, request: bytes,
                   reused: bool) -> tuple[int, bool] | None:
        """(status, keep alive), or None when a reused socket turned out closed."""
        reader, writer = connection
        try:
            writer.write(request)
            status_line = await reader.readline()
            if not status_line and reused:
                writer.close()
                return None
            return await _read_response(reader, status_line)
        except (OSError, asyncio.IncompleteReadError, ValueError, PostFailed) as exc:
            writer.close()
            if reused and isinstance(exc, ConnectionError):
                return None
            raise PostFailed(type(exc).__name__) from exc
        except BaseException:
            writer.close()
            raise

    def _keep(self, key: tuple[str, int], connection: Connection, status: int,
              keep_alive: bool) -> int:
        idle = self._idle[key]
        if keep_alive and len(idle) < self._max_idle:
            idle.append(connection)
        else:
            connection[1].close()
        return status


async def _read_response(reader: asyncio.StreamReader, status_line: bytes) -> tuple[int, bool]:
    version, _, rest = status_line.decode("latin-1").partition(" ")
    if not version.startswith("HTTP/1."):
        raise PostFailed("not_http")
    status = int(rest.split(" ", 1)[0])
    keep_alive = version == "HTTP/1.1"
    length: int | None = None
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            keep_alive = value == "keep-alive" or (keep_alive and value != "close")
    if chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
    elif length is not None:
        await reader.readexactly(length)
    elif status not in (204, 304) and not 100 <= status < 200:
        with contextlib.suppress(OSError):
            await reader.read()  # the body runs until the receiver closes
        keep_alive = False
    return status, keep_alive
