"""Broadcasts: the pre-flight quote and the runner that sends to every recipient."""
