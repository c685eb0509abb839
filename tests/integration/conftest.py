import pytest

from dispatcher.pricing.digit_diagrams import forget_patterns
from dispatcher.pricing.numbers import CALLING_CODES, NSN_LENGTHS, default_resolver
from tests.integration.dispatcher_fixture import dispatcher  # noqa: F401
from tests.integration.sandbox_fixture import twilio_sandbox  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def _warm_resolver() -> None:
    """Build the country resolver once, before any service starts: each service's own warm-up
    (tested in test_service_warmup) then finds it built, and no test runs beside its thread
    (which made timing-sensitive tests flakier: the burst-order test in test_pause_resume)."""
    resolver = default_resolver()
    for code in CALLING_CODES:
        for length in (None, *NSN_LENGTHS):
            resolver.warm_up(code, length)
    forget_patterns()
