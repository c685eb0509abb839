"""Build the country resolver's regexes and diagrams at start-up, off the event loop.

Built on first use, they cost the first pre-flight after a start 10-30 ms a calling code (a
20-country list: 0.25-0.6 s with the event loop blocked). The warm-up builds every calling
code, piece by piece in a worker thread (~3 s on 2 cores; with ``rest``, spread out by pauses
between pieces so a loop busy meanwhile keeps most of the GIL): the loop waits for the GIL a switch
interval (5 ms) at most, except through the few full garbage collections the allocations set
off (tens of ms each, as on the lazy path). A pre-flight meanwhile is answered as before,
building what the warm-up has not reached yet itself.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from dispatcher.pricing.digit_diagrams import forget_patterns
from dispatcher.pricing.numbers import CALLING_CODES, NSN_LENGTHS, CountryResolver

log = structlog.get_logger(__name__)
REST_PER_PIECE = 4.0  # seconds of rest per second of building


async def warm_up(resolver: CountryResolver, stop: asyncio.Event, *,
                  rest: float = REST_PER_PIECE) -> None:
    """Build every calling code (until ``stop``): its regexes, then its diagram for each length,
    one worker-thread call a piece, so a pre-flight on the loop shares the GIL with one piece at
    most (+1's regexes, the largest: ~80 ms)."""
    started = time.perf_counter()
    built = 0
    for code in CALLING_CODES:
        for length in (None, *NSN_LENGTHS):
            if stop.is_set():
                return
            if resolver.warmed(code, length):  # a second service in this process
                continue
            piece_started = time.perf_counter()
            try:
                await asyncio.to_thread(resolver.warm_up, code, length)
            except Exception:
                # Best effort: the first number needing it builds it (and fails) as before.
                log.exception("resolver_warm_up_failed", calling_code=code, length=length)
                continue
            built += 1
            # The thread shares the GIL with the loop while it builds: rest in between, so
            # jobs handled meanwhile (a transactional one behind a backlog at start-up) are
            # slowed at most a fifth of the time.
            await asyncio.sleep(rest * (time.perf_counter() - piece_started))
    forget_patterns()  # every diagram is built: a later one (a failed code's) rebuilds its own
    log.info("resolver_warmed_up", calling_codes=len(resolver.warm_codes), pieces=built,
             seconds=round(time.perf_counter() - started, 3))
