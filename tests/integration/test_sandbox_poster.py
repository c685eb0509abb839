"""The sandbox's callback poster speaks enough HTTP/1.1 to any receiver, kept-alive or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from dispatcher.sandbox.poster import FormPoster, PostFailed


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    async def plain(request: web.Request) -> web.Response:
        seen.append({k: str(v) for k, v in (await request.post()).items()})
        return web.Response(status=204)

    async def chunked(request: web.Request) -> web.StreamResponse:
        seen.append({k: str(v) for k, v in (await request.post()).items()})
        response = web.StreamResponse(status=202)
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"part one, ")
        await response.write(b"part two")
        await response.write_eof()
        return response

    async def closing(request: web.Request) -> web.Response:
        seen.append({k: str(v) for k, v in (await request.post()).items()})
        return web.json_response({"code": "nope"}, status=500, headers={"Connection": "close"})

    app = web.Application()
    app.router.add_post("/plain", plain)
    app.router.add_post("/chunked", chunked)
    app.router.add_post("/closing", closing)
    runner = web.AppRunner(app, keepalive_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_posts_reuse_connections_and_survive_the_receiver_closing_them(
        receiver: tuple[str, list[dict[str, str]]]) -> None:
    base, seen = receiver
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with aiohttp.ClientSession() as session:
        poster = FormPoster(session, timeout=5)
        try:
            statuses = [await poster.post(f"{base}/{path}?x=1", f"n={i}&to=%2B1".encode(),
                                          headers)
                        for i, path in enumerate(["plain", "chunked", "plain", "closing",
                                                  "plain"])]
            await asyncio.sleep(0.5)  # the receiver drops the idle kept-alive socket
            statuses.append(await poster.post(f"{base}/plain", b"n=5&to=%2B1", headers))
            statuses += await asyncio.gather(*(poster.post(f"{base}/plain", b"n=9&to=%2B1",
                                                           headers) for _ in range(20)))
        finally:
            await poster.close()
    assert statuses == [204, 202, 204, 500, 204, 204] + [204] * 20
    assert [s["n"] for s in seen[:6]] == ["0", "1", "2", "3", "4", "5"]
    assert {s["to"] for s in seen} == {"+1"}


async def test_a_receiver_that_is_down_fails_the_post() -> None:
    async with aiohttp.ClientSession() as session:
        poster = FormPoster(session, timeout=5)
        with pytest.raises(PostFailed):
            await poster.post("http://127.0.0.1:9/status", b"n=1", {})
