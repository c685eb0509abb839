"""JobPublisher and BillingEventPublisher against the real RabbitMQ: what lands, and what raises."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from billing_client import (
    AutoRecharge,
    BalanceLow,
    BillingEventPublisher,
    CreditsGranted,
    PublishFailed,
    decode_event,
)
from dispatcher.errors import ServiceUnavailable
from dispatcher.events.publisher import JobNotPublished, JobPublisher
from dispatcher.jobs.contract import InvalidJob, SmsJob, parse_job, validate_job
from dispatcher.settings import Settings

AMQP_URL = Settings.from_env().amqp_url
SMS = {"schema_version": 1, "id": "job-int-1", "kind": "sms", "account": "acme",
       "from": "+14155550100", "to": "+14155552671", "body": "hello",
       "metadata": {"order": "A-1"}}


@dataclass(frozen=True)
class Exchanges:
    """A bound topic exchange (queue on ``#``) and an unbound one, both unique to the test."""

    routed: str
    unrouted: str
    queue: AbstractQueue


@pytest.fixture
async def channel() -> AsyncIterator[AbstractChannel]:
    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=5)
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL}: {exc!r} "
                    "(start it with: rabbitmq-server -detached)")
    async with connection:
        yield await connection.channel()


@pytest.fixture
async def exchanges(channel: AbstractChannel) -> AsyncIterator[Exchanges]:
    name = f"test.publisher.{uuid.uuid4().hex[:10]}"
    routed = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(f"{name}.unrouted", aio_pika.ExchangeType.TOPIC)
    queue = await channel.declare_queue(name, durable=True)
    await queue.bind(routed, routing_key="#")
    try:
        yield Exchanges(name, f"{name}.unrouted", queue)
    finally:
        await channel.queue_delete(name)
        await channel.exchange_delete(name)
        await channel.exchange_delete(f"{name}.unrouted")


async def next_message(queue: AbstractQueue) -> AbstractIncomingMessage:
    message = await queue.get(timeout=5, fail=True)
    assert message is not None
    await message.ack()
    return message


async def test_job_is_published_persistent_and_round_trips(exchanges: Exchanges) -> None:
    async with await JobPublisher.connect(AMQP_URL, exchanges.routed) as publisher:
        job = await publisher.publish(SMS)
    message = await next_message(exchanges.queue)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (message.message_id, message.type, message.routing_key) == (
        "job-int-1", "sms", "sms.transactional")
    assert message.content_type == "application/json"
    assert parse_job(message.body) == job
    assert isinstance(job, SmsJob)
    assert job.metadata == {"order": "A-1"}


async def test_routing_key_is_kind_and_priority(exchanges: Exchanges) -> None:
    broadcast = {"schema_version": 1, "id": "bc-1", "kind": "broadcast", "account": "acme",
                 "from": "ACME", "body": "Hi {n}",
                 "recipients": [{"to": "+14155552671", "vars": {"n": "Ada"}}]}
    call = {"schema_version": 1, "id": "call-1", "kind": "call", "account": "acme",
            "from": "+14155550100", "to": "+14155552671", "url": "https://example.com/t",
            "max_minutes": 3, "priority": "bulk"}
    async with await JobPublisher.connect(AMQP_URL, exchanges.routed) as publisher:
        await publisher.publish(broadcast)
        await publisher.publish(validate_job(call))  # a model is re-checked and sent as well
    keys = [(await next_message(exchanges.queue)).routing_key for _ in range(2)]
    assert keys == ["broadcast.bulk", "call.bulk"]


async def test_invalid_job_is_never_sent(exchanges: Exchanges) -> None:
    async with await JobPublisher.connect(AMQP_URL, exchanges.routed) as publisher:
        with pytest.raises(InvalidJob) as caught:
            await publisher.publish({**SMS, "to": "0044207183875"})
    assert caught.value.reason == "invalid_recipient"
    assert await exchanges.queue.get(timeout=1, fail=False) is None


async def test_unroutable_job_raises(exchanges: Exchanges) -> None:
    async with await JobPublisher.connect(AMQP_URL, exchanges.unrouted) as publisher:
        with pytest.raises(JobNotPublished) as caught:
            await publisher.publish(SMS)
        assert (caught.value.reason, caught.value.job_id) == ("unroutable", "job-int-1")
        with pytest.raises(JobNotPublished) as timed_out:
            await publisher.publish(SMS, timeout=0)
        assert timed_out.value.reason == "timeout"


async def test_missing_exchange_is_reported_at_connect() -> None:
    with pytest.raises(ServiceUnavailable, match="does not exist"):
        await JobPublisher.connect(AMQP_URL, f"test.missing.{uuid.uuid4().hex}")


async def test_billing_event_is_published_with_its_id_and_type(exchanges: Exchanges) -> None:
    event = BalanceLow(account="acme", available=380, threshold=400, episode=2,
                       auto_recharge=AutoRecharge(enabled=True, threshold=400, amount=1000))
    async with await BillingEventPublisher.connect(AMQP_URL, exchanges.routed) as publisher:
        await publisher.publish(event)
    message = await next_message(exchanges.queue)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (message.message_id, message.type, message.routing_key) == (
        str(event.event_id), "balance.low", "balance.low")
    assert decode_event(message.body) == event


async def test_unroutable_billing_event_raises_only_when_mandatory(exchanges: Exchanges) -> None:
    grant = CreditsGranted(account="acme", amount=1000, kind="purchase",
                           payment_reference=f"pay-{uuid.uuid4().hex}")
    async with await BillingEventPublisher.connect(AMQP_URL, exchanges.unrouted) as publisher:
        with pytest.raises(PublishFailed) as caught:
            await publisher.publish(grant)
        assert caught.value.reason == "unroutable"
    relaxed = await BillingEventPublisher.connect(AMQP_URL, exchanges.unrouted, mandatory=False)
    async with relaxed:
        await relaxed.publish(grant)
