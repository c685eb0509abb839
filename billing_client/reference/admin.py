"""Operator and owner actions behind the CLI, usable in-process too: payment methods,
invoices, and the recharge safety settings (limits, turning auto-recharge back on)."""

from __future__ import annotations

from typing import Any

from billing_client.reference.decision import Verdict, check_limits, decide
from billing_client.reference.service import defaults_of, open_pool
from billing_client.reference.settings import BillingSettings
from billing_client.reference.store import BillingStore


async def set_payment_methods(settings: BillingSettings, account: str, *, primary: str,
                              backup: str | None = None, remove_backup: bool = False,
                              purpose: str = "auto_recharge") -> None:
    """Register the account's primary (and optionally backup) method for one purpose."""
    pool = await open_pool(settings)
    try:
        store = BillingStore(pool)
        await store.ensure_schema()
        await store.set_method(account, "primary", primary, purpose)
        if backup is not None or remove_backup:
            await store.set_method(account, "backup", backup, purpose)
    finally:
        await pool.close()


async def list_invoices(settings: BillingSettings, account: str) -> list[dict[str, Any]]:
    """The account's invoices, oldest first."""
    pool = await open_pool(settings)
    try:
        store = BillingStore(pool)
        await store.ensure_schema()
        return await store.invoices(account)
    finally:
        await pool.close()


async def set_recharge_limits(settings: BillingSettings, account: str,
                              **limits: Any) -> Verdict:
    """Set an account's recharge limits; a raised cap charges a still-low account at once
    (picked up by the running service's worker within its poll interval)."""
    check_limits(**limits)
    pool = await open_pool(settings)
    try:
        store = BillingStore(pool, defaults=defaults_of(settings))
        await store.ensure_schema()
        await store.set_limits(account, **limits)
        verdict, _ = await store.charge_now_if_low(account, decide)
        return verdict
    finally:
        await pool.close()


async def enable_auto_recharge(settings: BillingSettings, account: str) -> Verdict:
    """Owner action: turn auto-recharge back on after it paused itself; an account still below
    its threshold is charged once, at once."""
    pool = await open_pool(settings)
    try:
        store = BillingStore(pool, defaults=defaults_of(settings))
        await store.ensure_schema()
        await store.enable(account)
        verdict, _ = await store.charge_now_if_low(account, decide)
        return verdict
    finally:
        await pool.close()


async def recharge_status(settings: BillingSettings, account: str) -> dict[str, Any] | None:
    """The account's recharge limits and safety state (None: never seen)."""
    pool = await open_pool(settings)
    try:
        store = BillingStore(pool, defaults=defaults_of(settings))
        await store.ensure_schema()
        return await store.status(account)
    finally:
        await pool.close()
