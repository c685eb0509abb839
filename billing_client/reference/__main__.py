"""``python -m billing_client.reference``."""

from __future__ import annotations

from billing_client.reference.cli import main

raise SystemExit(main())
