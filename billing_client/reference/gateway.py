"""The payment gateway boundary: a Protocol, the outcome table, and a fake for local runs.

A charge carries an idempotency key: the same key sent again returns the first result and never
charges twice. That is what makes a timed-out charge safe to retry.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Protocol
from uuid import uuid4

ChargeStatus = Literal["succeeded", "declined", "insufficient_funds", "timeout", "error"]


@dataclass(frozen=True)
class ChargeResult:
    """What the gateway said about one charge request."""

    status: ChargeStatus
    charge_id: str | None = None
    detail: str = ""

    @property
    def succeeded(self) -> bool:
        """True when money moved and ``charge_id`` names the charge."""
        return self.status == "succeeded" and self.charge_id is not None


@dataclass(frozen=True)
class FailureRule:
    """How the service treats one failed charge status."""

    reason: str  # the ``topup.failed`` reason code
    # Definite: the charge did not happen, so the backup may be charged now. Not definite
    # (timeout): it may have happened; retry the same method with the same key later instead.
    definite: bool
    advice: str


_RAISE_AMOUNT = ("or raise the auto-recharge amount so charges happen less often")
# The one table that decides what a failed charge means.
FAILURES: dict[ChargeStatus, FailureRule] = {
    "declined": FailureRule("declined", True,
                            f"The card was declined: update the payment method, {_RAISE_AMOUNT}."),
    "insufficient_funds": FailureRule(
        "insufficient_funds", True,
        f"The payment method has insufficient funds: update it, {_RAISE_AMOUNT}."),
    "error": FailureRule("gateway_error", True,
                         f"The payment gateway failed: check the payment method, {_RAISE_AMOUNT}."),
    "timeout": FailureRule("timeout", False,
                           "The payment gateway did not answer in time; the charge is retried "
                           f"with the same key. Update the payment method, {_RAISE_AMOUNT}."),
}
NO_PAYMENT_METHOD = FailureRule("no_payment_method", True,
                                f"No payment method is registered: add one, {_RAISE_AMOUNT}.")


class PaymentGateway(Protocol):
    """Charges a stored payment-method token; idempotent by ``idempotency_key``."""

    async def charge(self, account: str, token: str, amount_credits: int,
                     idempotency_key: str) -> ChargeResult:
        """Charge ``amount_credits`` worth to ``token``; never raises for a refused charge."""
        ...


@dataclass(frozen=True)
class GatewayCall:
    """One request the fake gateway received (``charged``: money moved by this request)."""

    account: str
    token: str
    amount: int
    idempotency_key: str
    status: ChargeStatus
    charge_id: str | None
    charged: bool
    at: float  # time.monotonic()


FAKE_TOKENS: dict[str, ChargeStatus] = {
    "tok_ok": "succeeded", "tok_decline": "declined",
    "tok_insufficient_funds": "insufficient_funds", "tok_timeout": "timeout",
    "tok_error": "error",
}


class FakeGateway:
    """An in-memory gateway whose outcome is chosen by the token; records every request.

    ``tok_timeout`` hangs for ``timeout_delay`` and answers ``timeout``; when
    ``charge_behind_timeout`` is true the charge did go through, as happens with real gateways,
    and a retry with the same key returns that success.
    """

    def __init__(self, *, timeout_delay: float = 1.0, latency: float = 0.0,
                 charge_behind_timeout: bool = True) -> None:
        self.timeout_delay = timeout_delay
        self.latency = latency
        self.charge_behind_timeout = charge_behind_timeout
        self.calls: list[GatewayCall] = []
        self.max_concurrent: Counter[str] = Counter()
        self._results: dict[str, tuple[tuple[str, str, int], ChargeResult]] = {}
        self._running: Counter[str] = Counter()

    @property
    def charges(self) -> list[GatewayCall]:
        """Requests that moved money (replays of a key are not charges)."""
        return [call for call in self.calls if call.charged]

    def charges_for(self, account: str) -> list[GatewayCall]:
        """Money-moving requests of one account."""
        return [call for call in self.charges if call.account == account]

    def calls_for(self, account: str) -> list[GatewayCall]:
        """Every request of one account."""
        return [call for call in self.calls if call.account == account]

    async def charge(self, account: str, token: str, amount_credits: int,
                     idempotency_key: str) -> ChargeResult:
        """Answer by token; a known key replays its first result."""
        self._running[account] += 1
        self.max_concurrent[account] = max(self.max_concurrent[account], self._running[account])
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            result, charged = await self._answer(account, token, amount_credits, idempotency_key)
        finally:
            self._running[account] -= 1
        self.calls.append(GatewayCall(account, token, amount_credits, idempotency_key,
                                      result.status, result.charge_id, charged, time.monotonic()))
        return result

    async def _answer(self, account: str, token: str, amount: int,
                      key: str) -> tuple[ChargeResult, bool]:
        """The result for a request, and whether it moved money."""
        request = (account, token, amount)
        if key in self._results:
            first_request, first = self._results[key]
            if first_request != request:
                return ChargeResult("error", detail="idempotency_key_reused"), False
            return first, False
        status = FAKE_TOKENS.get(token, "declined")
        if status == "timeout":
            await asyncio.sleep(self.timeout_delay)
            if self.charge_behind_timeout:
                self._results[key] = (request, self._success())
                return ChargeResult("timeout", detail="no answer in time"), True
            return ChargeResult("timeout", detail="no answer in time"), False
        result = self._success() if status == "succeeded" else ChargeResult(status)
        self._results[key] = (request, result)
        return result, result.succeeded

    def _success(self) -> ChargeResult:
        return ChargeResult("succeeded", charge_id=f"ch_fake_{uuid4().hex[:20]}")
