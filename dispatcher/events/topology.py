"""RabbitMQ names and their idempotent declaration.

Jobs arrive on the topic exchange ``<prefix>.jobs`` with routing keys ``<kind>.<priority>``.
Two quorum queues take them, each with an explicit delivery limit and a dead-letter exchange
(RabbitMQ 3.10 quorum queues have no default limit). On a cluster, ``quorum_group_size``
(``DISPATCHER_AMQP_QUORUM_GROUP_SIZE``, 3 for 3 nodes) replicates each quorum queue on that many
nodes, so it survives the loss of a minority of them; the retry queues are then quorum queues
too (a classic queue lives on one node, and while that node is down it cannot be redeclared, so
no client could restore its channels on the others). Transient failures wait in retry queues
(classic on a single node) whose TTL dead-letters them back to their work queue. Rejected jobs
land on ``<prefix>.dead`` with their reason in the headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

# Queue arguments (pamqp's FieldTable, which aio-pika's declare_queue takes).
FieldTable = dict[str, Any]

PRIORITIES = ("transactional", "bulk")
RETRY_DELAYS_SECONDS = (1, 5, 30, 120)


@dataclass(frozen=True)
class Names:
    """Every exchange and queue name, derived from one prefix."""

    prefix: str

    @property
    def jobs_exchange(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def billing_exchange(self) -> str:
        return f"{self.prefix}.billing"

    def work_queue(self, priority: str) -> str:
        return f"{self.prefix}.{priority}"

    def retry_queue(self, priority: str, delay: int) -> str:
        return f"{self.prefix}.retry.{priority}.{delay}s"

    def retry_delay(self, attempt: int) -> int:
        """Increasing delays; the last one repeats."""
        return RETRY_DELAYS_SECONDS[min(attempt, len(RETRY_DELAYS_SECONDS)) - 1]

    def all_queues(self) -> list[str]:
        queues = [self.work_queue(p) for p in PRIORITIES] + [self.dead_queue]
        queues += [self.retry_queue(p, d) for p in PRIORITIES for d in RETRY_DELAYS_SECONDS]
        return queues

    def all_exchanges(self) -> list[str]:
        return [self.jobs_exchange, self.dead_exchange, self.events_exchange,
                self.billing_exchange]


@dataclass(frozen=True)
class Topology:
    """The declared objects a consumer and publishers use."""

    jobs: AbstractExchange
    dead: AbstractExchange
    events: AbstractExchange
    billing: AbstractExchange
    work_queues: dict[str, AbstractQueue]


def quorum(group_size: int = 0, arguments: FieldTable | None = None) -> FieldTable:
    """Arguments of a quorum queue, replicated on ``group_size`` nodes if set (0: the broker's
    default)."""
    extra: FieldTable = {"x-quorum-initial-group-size": group_size} if group_size else {}
    return {"x-queue-type": "quorum", **extra, **(arguments or {})}


async def declare(channel: AbstractChannel, names: Names, delivery_limit: int,
                  quorum_group_size: int = 0) -> Topology:
    """Declare everything (idempotent: same arguments every time)."""
    topic = aio_pika.ExchangeType.TOPIC
    jobs = await channel.declare_exchange(names.jobs_exchange, topic, durable=True)
    dead = await channel.declare_exchange(names.dead_exchange, aio_pika.ExchangeType.FANOUT,
                                          durable=True)
    events = await channel.declare_exchange(names.events_exchange, topic, durable=True)
    billing = await channel.declare_exchange(names.billing_exchange, topic, durable=True)
    dead_queue = await channel.declare_queue(
        names.dead_queue, durable=True, arguments=quorum(quorum_group_size))
    await dead_queue.bind(dead, routing_key="#")
    work_queues: dict[str, AbstractQueue] = {}
    for priority in PRIORITIES:
        queue = await channel.declare_queue(
            names.work_queue(priority), durable=True, arguments=quorum(
                quorum_group_size, {
                    "x-delivery-limit": delivery_limit,
                    "x-dead-letter-exchange": names.dead_exchange,
                    "x-dead-letter-routing-key": "delivery_limit"}))
        await queue.bind(jobs, routing_key=f"*.{priority}")
        work_queues[priority] = queue
        for delay in RETRY_DELAYS_SECONDS:
            retry: FieldTable = {
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": names.work_queue(priority),
            }
            # On a cluster a classic queue lives on one node: while that node is down it cannot
            # even be redeclared, and every reconnect's restore fails. Quorum there (TTL and
            # dead-lettering work for quorum queues since RabbitMQ 3.10).
            await channel.declare_queue(
                names.retry_queue(priority, delay), durable=True,
                arguments=quorum(quorum_group_size, retry) if quorum_group_size else retry)
    return Topology(jobs, dead, events, billing, work_queues)


async def delete_all(channel: AbstractChannel, names: Names) -> None:
    """Remove every queue and exchange of this prefix (tests and teardown)."""
    for queue in names.all_queues():
        await channel.queue_delete(queue)
    for exchange in names.all_exchanges():
        await channel.exchange_delete(exchange)
