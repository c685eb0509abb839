"""Operator actions behind the CLI, usable in-process too: payment methods and invoices."""

from __future__ import annotations

from typing import Any

from billing_client.reference.service import open_pool
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
