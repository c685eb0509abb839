"""The reference billing service's error tree: one base, docstrings as default messages."""

from __future__ import annotations

from billing_client.events import BillingClientError


class BillingServiceError(BillingClientError):
    """Reference billing service error."""

    code = "billing_service_error"


class InvalidSettings(BillingServiceError):
    """A ``BILLING_*`` setting is not valid."""

    code = "invalid_settings"


class ServiceUnavailable(BillingServiceError):
    """PostgreSQL or RabbitMQ cannot be reached."""

    code = "service_unavailable"


class InvalidPaymentMethod(BillingServiceError):
    """The payment method's account, role, purpose or token is not valid."""

    code = "invalid_payment_method"


class GatewayError(BillingServiceError):
    """The payment gateway failed before it could charge (the charge did not happen)."""

    code = "gateway_error"
