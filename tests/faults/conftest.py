from tests.integration.conftest import _warm_resolver  # noqa: F401
from tests.integration.sandbox_fixture import twilio_sandbox  # noqa: F401
