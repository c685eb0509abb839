"""The contract between the dispatcher and the billing service: events and their publisher."""

from __future__ import annotations

from billing_client.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    AutoRecharge,
    BalanceDepleted,
    BalanceForecast,
    BalanceLow,
    BillingClientError,
    BillingEvent,
    CreditsGranted,
    DeclinedCharge,
    InvalidEvent,
    TopupCapped,
    TopupCapWarning,
    TopupDisabled,
    TopupFailed,
    decode_event,
    encode_event,
)
from billing_client.publisher import BillingEventPublisher, ConfirmedPublisher, PublishFailed

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "AutoRecharge",
    "BalanceDepleted",
    "BalanceForecast",
    "BalanceLow",
    "BillingClientError",
    "BillingEvent",
    "BillingEventPublisher",
    "ConfirmedPublisher",
    "CreditsGranted",
    "DeclinedCharge",
    "InvalidEvent",
    "PublishFailed",
    "TopupCapWarning",
    "TopupCapped",
    "TopupDisabled",
    "TopupFailed",
    "decode_event",
    "encode_event",
]
