"""Small asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event, seconds: float | None) -> None:
    """Return when any event is set or ``seconds`` passed (``None``: no limit)."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
