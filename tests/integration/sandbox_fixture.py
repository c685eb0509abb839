"""The ``twilio_sandbox`` fixture: our Twilio-compatible sandbox on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio
from twilio.rest import Client

from dispatcher.sandbox import SandboxServer, SandboxState
from dispatcher.twilio.http import SandboxAwareHttpClient


@dataclass
class SandboxHandle:
    """A running sandbox: where it listens, its credentials, and its state."""

    server: SandboxServer
    base_url: str
    account_sid: str
    auth_token: str
    state: SandboxState
    _http_clients: list[SandboxAwareHttpClient] = field(default_factory=list)

    def client(self, timeout: float = 2.0, auth_token: str | None = None,
               account_sid: str | None = None) -> Any:
        """An official ``twilio.rest.Client`` aimed at the sandbox (closed after the test)."""
        http = SandboxAwareHttpClient(base_url=self.base_url, timeout=timeout)
        self._http_clients.append(http)
        return Client(account_sid or self.account_sid, auth_token or self.auth_token,
                      http_client=http)

    async def wait_callbacks(self, seconds: float = 5.0) -> None:
        """Wait until every accepted resource reached its final status and was reported."""
        await self.server.callbacks.wait_idle(seconds)

    async def close_clients(self) -> None:
        """Close the HTTP sessions of clients made by ``client()``."""
        for http in self._http_clients:
            await http.close()


@pytest_asyncio.fixture
async def twilio_sandbox() -> AsyncIterator[SandboxHandle]:
    """Start the sandbox in-process on 127.0.0.1 and a free port; stop it after the test."""
    server = SandboxServer(callback_timeout=2.0)
    base_url = await server.start("127.0.0.1", 0)
    handle = SandboxHandle(server, base_url, server.state.account_sid, server.state.auth_token,
                           server.state)
    try:
        yield handle
    finally:
        await handle.close_clients()
        await server.stop()
