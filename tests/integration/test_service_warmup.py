"""The service builds the country resolver's diagrams while it starts, before any job runs."""

from __future__ import annotations

import asyncpg

from dispatcher.pricing.numbers import CALLING_CODES, default_resolver
from dispatcher.settings import Settings
from tests.integration.dispatcher_fixture import running_dispatcher
from tests.integration.sandbox_fixture import SandboxHandle


async def test_the_service_warms_the_country_resolver_up_before_it_consumes(
        settings: Settings, twilio_sandbox: SandboxHandle, pool: asyncpg.Pool) -> None:
    default_resolver.cache_clear()  # as in a new process: this service's resolver starts cold
    async with running_dispatcher(settings, twilio_sandbox, pool) as d:
        assert default_resolver().warm_codes == set(CALLING_CODES)
        assert not d.stop.is_set()
