"""A Twilio-compatible sandbox: the Messages and Calls API, signed status callbacks, faults."""

from __future__ import annotations

from dispatcher.sandbox.app import SandboxServer
from dispatcher.sandbox.state import (
    CallbackRecord,
    CreateRecord,
    NumberRule,
    SandboxState,
    Scenario,
)

__all__ = [
    "CallbackRecord",
    "CreateRecord",
    "NumberRule",
    "SandboxServer",
    "SandboxState",
    "Scenario",
]
