from tests.integration.sandbox_fixture import twilio_sandbox  # noqa: F401
