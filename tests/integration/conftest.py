from tests.integration.dispatcher_fixture import dispatcher  # noqa: F401
from tests.integration.sandbox_fixture import twilio_sandbox  # noqa: F401
