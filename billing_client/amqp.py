"""A robust AMQP connection to a RabbitMQ cluster: several addresses, whichever node answers.

``connect_robust("amqp://u:p@node1:5672/,amqp://u:p@node2:5672/,...")`` takes one address or a
comma-separated list. Every connect (the first one and every reconnect after a node died) tries
the addresses in turn, starting with the one after the node it last used, and keeps the first
that answers; only when none does it waits aio-pika's ``reconnect_interval`` and tries them all
again. Channels, consumers and declared objects are restored on the new node by aio-pika's
robust machinery. Connection options (``heartbeat``, ``reconnect_interval``…) come from the
first address's query string.

aio-pika's ``connect_robust`` takes one URL (mosquito/aio-pika#141): the hook used here is the
robust connection's private per-attempt transport connect, checked at import so an aio-pika
upgrade that renames it fails loudly, not silently back to one node. Frames written in one loop
pass go out in one system call (``amqp_writes``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import structlog
from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from billing_client.amqp_writes import CoalescingTransportFactory

log = structlog.get_logger(__name__)

# The per-attempt transport connect of aio-pika's RobustConnection (name-mangled private).
_CONNECT_TRANSPORT = "_RobustConnection__connect_transport"
if not hasattr(RobustConnection, _CONNECT_TRANSPORT):  # pragma: no cover - an aio-pika upgrade
    raise ImportError("aio_pika.RobustConnection has no per-attempt transport connect to rotate "
                      "cluster addresses in: check billing_client/amqp.py against this aio-pika")


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The addresses in ``urls``: a comma-separated string or a sequence; at least one."""
    parts = urls.split(",") if isinstance(urls, str) else list(urls)
    found = [part.strip() for part in parts if part.strip()]
    if not found:
        raise ValueError("no AMQP address given")
    return found


def redacted(url: object) -> str:
    """``url`` without its password, for logs."""
    parsed = make_url(str(url))
    return str(parsed.with_password("******") if parsed.password else parsed)


class ClusterConnection(RobustConnection):
    """A ``RobustConnection`` that rotates through the cluster's addresses on every connect."""

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        self.urls = [make_url(url) for url in split_urls(urls)]
        self._current = 0
        self._connected_once = False
        super().__init__(self.urls[0], **kwargs)
        self.kwargs["transport_factory"] = CoalescingTransportFactory()

    @property
    def node(self) -> str:
        """The address (without password) in use, or tried last."""
        return redacted(self.urls[self._current])

    async def _connect_each(self, attempt: Callable[[], Awaitable[None]]) -> None:
        """Try every address once, from the one after the node last used; raise the last error."""
        start = self._current
        for step in range(len(self.urls)):
            index = (start + step) % len(self.urls)
            self._current = index
            self.url = self.urls[index]
            try:
                await attempt()
            except CONNECTION_EXCEPTIONS as exc:
                if step == len(self.urls) - 1:
                    raise
                log.warning("amqp_node_unreachable", node=self.node, error=type(exc).__name__,
                            next_node=redacted(self.urls[(index + 1) % len(self.urls)]))
                continue
            if self._connected_once:  # a reconnect (maybe to another node) is worth a warning
                log.warning("amqp_reconnected", node=self.node, nodes=len(self.urls))
            else:
                log.info("amqp_connected", node=self.node, nodes=len(self.urls))
            self._connected_once = True
            return

    async def _RobustConnection__connect_transport(self) -> None:
        """aio-pika's per-attempt connect (private, see the module doc), over every address."""
        original = cast(Callable[[RobustConnection], Awaitable[None]],
                        getattr(RobustConnection, _CONNECT_TRANSPORT))
        await self._connect_each(lambda: original(self))

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # The node we used is likely gone: the next connect starts with the next address.
        if not (self._close_called or self.is_closed) and len(self.urls) > 1:
            self._current = (self._current + 1) % len(self.urls)
        await super()._on_connection_close(closing)


async def connect_robust(urls: str | Sequence[str], *, timeout: float | None = None,  # noqa: ASYNC109
                         reconnect_interval: float | None = None) -> AbstractRobustConnection:
    """A robust connection to the first node of ``urls`` that answers (see the module doc)."""
    kwargs: dict[str, Any] = {}
    if reconnect_interval is not None:
        kwargs["reconnect_interval"] = reconnect_interval
    connection = ClusterConnection(split_urls(urls), **kwargs)
    await connection.connect(timeout=timeout)
    return connection
