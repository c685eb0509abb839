"""A runnable reference billing service: consumes balance events, charges, grants credits.

It charges the account's primary auto-recharge method, then its backup; never has two top-ups
in flight for one account; backs off and retries after failures, then gives up for the episode;
and replies with ``credits.granted`` (or ``topup.failed``) through a confirmed outbox. Before
every new charge it enforces the recharge safety rules: charges per hour, a monthly cap
(``topup.cap_warning``, ``topup.capped``) and a pause after consecutive declines
(``topup.disabled``) that only an owner lifts.
"""

from __future__ import annotations

from billing_client.reference.admin import (
    enable_auto_recharge,
    list_invoices,
    recharge_status,
    set_payment_methods,
    set_recharge_limits,
)
from billing_client.reference.errors import (
    BillingServiceError,
    GatewayError,
    InvalidPaymentMethod,
    InvalidSettings,
    ServiceUnavailable,
)
from billing_client.reference.gateway import (
    ChargeResult,
    ChargeStatus,
    FakeGateway,
    GatewayCall,
    PaymentGateway,
)
from billing_client.reference.service import ReferenceBillingService
from billing_client.reference.settings import BillingSettings

__all__ = [
    "BillingServiceError",
    "BillingSettings",
    "ChargeResult",
    "ChargeStatus",
    "FakeGateway",
    "GatewayCall",
    "GatewayError",
    "InvalidPaymentMethod",
    "InvalidSettings",
    "PaymentGateway",
    "ReferenceBillingService",
    "ServiceUnavailable",
    "enable_auto_recharge",
    "list_invoices",
    "recharge_status",
    "set_payment_methods",
    "set_recharge_limits",
]
