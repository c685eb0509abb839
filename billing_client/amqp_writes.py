"""AMQP frames written during one event-loop pass leave in one system call.

aiormq hands each frame (an ack, a publish, a confirm's method) to its stream writer on its own,
and the transport sends each at once: on a busy consumer that is one ``write`` per frame, and on
loopback the broker's receive path runs inside each of them. ``CoalescingTransportFactory`` is
aiormq's own extension point (``transport_factory``): the writer it returns keeps what is
written during one pass of the loop and gives it to the transport at the start of the next one,
in order, as one write. ``drain`` does not send early (aiormq drains after every frame with a
waiter, which would undo the gathering): it waits, as before, only while the transport's own
buffer is above its high-water mark, and what is kept is at most one pass's frames, so
back-pressure works as it did. ``close`` sends what is kept first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError


class CoalescingWriter(asyncio.StreamWriter):
    """A ``StreamWriter`` whose writes within one loop pass go out as one."""

    def __init__(self, transport: asyncio.Transport, protocol: asyncio.StreamReaderProtocol,
                 reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._kept: list[bytes | bytearray | memoryview] = []
        self._writer_loop = loop

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._kept:
            self._writer_loop.call_soon(self.flush)
        self._kept.append(data)

    def flush(self) -> None:
        """Hand what was written so far to the transport."""
        if not self._kept:
            return
        kept, self._kept = self._kept, []
        super().writelines(kept)

    def close(self) -> None:
        self.flush()
        super().close()


class CoalescingTransportFactory(TransportFactory):
    """aiormq's TCP (and TLS) transport, with a ``CoalescingWriter`` (the last one made is
    ``writer``)."""

    writer: CoalescingWriter | None = None

    async def create(self, url: Any, **kwargs: Any  # a yarl.URL, as aiormq passes it
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        provider = kwargs.pop("ssl_context_provider", None)
        ssl = await provider.get_context() if url.scheme == "amqps" and provider else None
        loop = asyncio.get_running_loop()
        # asyncio.open_connection's own steps, with our writer.
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol, host=str(url.host), port=int(url.port), ssl=ssl, **kwargs)
        except OSError as exc:
            raise AMQPConnectionError(*exc.args) from exc
        self.writer = CoalescingWriter(transport, protocol, reader, loop)
        return reader, self.writer
