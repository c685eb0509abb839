"""The service builds the country resolver's diagrams in the background once it is up."""

from __future__ import annotations

import asyncio

import asyncpg

from dispatcher.numbers import CALLING_CODES, default_resolver
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import running_dispatcher
from tests.integration.sandbox_fixture import SandboxHandle


async def test_the_service_warms_the_country_resolver_up_in_the_background(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    default_resolver.cache_clear()  # as in a new process: this service's resolver starts cold
    async with running_dispatcher(settings, twilio_sandbox, pool) as d:
        [warming] = [t for t in d.service.tasks if t.get_name() == "resolver-warm-up"]
        await asyncio.wait_for(warming, timeout=60)
        assert default_resolver().warm_codes == set(CALLING_CODES)
        assert not d.stop.is_set()
