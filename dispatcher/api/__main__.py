"""``python -m dispatcher.api``: rewrite ``openapi.json`` from the route table and models."""

from __future__ import annotations

from dispatcher.api.openapi import main

main()
