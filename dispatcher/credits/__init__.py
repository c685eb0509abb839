"""Credits: the ledger (reserve, capture, release, grants), rates, subscriptions and the audit."""
