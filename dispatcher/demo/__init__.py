"""``dispatcher demo``: the whole local stack, end to end (never imported by the service)."""
