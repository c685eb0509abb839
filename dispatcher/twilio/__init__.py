"""Twilio: the official client, its error codes, status callbacks and reconciliation."""
