"""Every metric of the issue moves when its event happens, read back through ``/metrics``."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import aio_pika
import aiohttp

from billing_client.events import CreditsGranted, encode_event
from dispatcher.credits.ledger import CreditStore
from dispatcher.events.topology import Names
from dispatcher.sandbox import NumberRule
from tests.integration.dispatcher_fixture import RunningDispatcher, wait_for
from tests.integration.ops_fixture import Samples, ops_dispatcher, scrape, value

__all__ = ["ops_dispatcher"]

REFUSED = "+14155550142"  # the sandbox refuses it with 21211 (invalid 'To'): a 4xx


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def settle(d: RunningDispatcher, check: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``check`` holds (the gauges and the ledger sampler lag a little)."""
    latest: Samples = {}

    async def metrics_settled() -> bool:
        nonlocal latest
        latest = await scrape(d.settings.public_base_url)
        return check(latest)
    await wait_for(metrics_settled, timeout=15)
    return latest


def first_pass_done(m: Samples) -> bool:
    return (value(m, "dispatcher_held_jobs") == 1
            and value(m, "dispatcher_credits_total", operation="captured") == 4
            and value(m, "dispatcher_outbox_backlog") == 0)


def resumed(m: Samples) -> bool:
    return (value(m, "dispatcher_held_jobs") == 0 and value(m, "dispatcher_paused_accounts") == 0
            and value(m, "dispatcher_credits_total", operation="granted") == 14)


async def test_jobs_credits_latency_holds_and_errors_show_up_in_metrics(
        ops_dispatcher: RunningDispatcher) -> None:
    d = ops_dispatcher
    before = await scrape(d.settings.public_base_url)
    assert value(before, "dispatcher_consumers_attached") == 2
    assert value(before, "dispatcher_jobs_total", kind="sms", outcome="sent") == 0
    d.sandbox.state.set_rule(REFUSED, NumberRule(error_code=21211))
    account = await d.funded_account(uid("m"), 4, enabled=True, threshold=3, amount=100)
    await d.publish_sms(uid("refused"), account, to=REFUSED)
    for i in range(5):
        await d.publish_sms(uid(f"ok{i}"), account, to=f"+1415555{1000 + i}")
    await d.publisher.publish({"schema_version": 1, "id": uid("bad"), "kind": "sms",
                               "account": uid("nobody"), "to": "+14155550100",
                               "from": "+14155550199", "body": "x"})

    m = await settle(d, first_pass_done)
    sms = {"kind": "sms"}
    assert value(m, "dispatcher_jobs_total", **sms, outcome="consumed") == 7
    assert value(m, "dispatcher_jobs_total", **sms, outcome="sent") == 4
    assert value(m, "dispatcher_jobs_total", **sms, outcome="failed") == 1
    assert value(m, "dispatcher_jobs_total", **sms, outcome="held") >= 1
    assert value(m, "dispatcher_jobs_total", **sms, outcome="dead_lettered") == 1
    assert value(m, "dispatcher_dead_letters_total", reason="unknown_account") == 1
    assert value(m, "dispatcher_twilio_errors_total", code_class="4xx") == 1
    assert value(m, "dispatcher_reservation_seconds_count") == 7
    assert value(m, "dispatcher_send_seconds_count", **sms) == 5
    assert value(m, "dispatcher_queue_wait_seconds_count") == 7
    assert value(m, "dispatcher_record_seconds_count") == 4
    assert value(m, "dispatcher_end_to_end_seconds_count", **sms) == 4
    # 5 reserved, 1 released (the refused one), 4 captured on delivery callbacks.
    assert value(m, "dispatcher_credits_total", operation="reserved") == 5
    assert value(m, "dispatcher_credits_total", operation="released") == 1
    assert value(m, "dispatcher_credits_total", operation="granted") == 4
    assert value(m, "dispatcher_paused_accounts") == 1
    assert value(m, "dispatcher_oldest_held_job_age_seconds") > 0
    assert value(m, "dispatcher_low_balance_events_total", type="balance_low") == 1
    assert value(m, "dispatcher_low_balance_events_total", type="balance_depleted") >= 1
    assert value(m, "dispatcher_outbox_lag_seconds") == 0
    assert value(m, "dispatcher_in_flight_jobs") == 0
    assert value(m, "dispatcher_status_callbacks_total", result="accepted") >= 4

    await CreditStore(d.pool).grant(account, 10, "purchase", uid("pay"))
    m = await settle(d, resumed)
    assert value(m, "dispatcher_jobs_total", **sms, outcome="sent") == 5
    assert value(m, "dispatcher_jobs_total", **sms, outcome="released") >= 1
    assert value(m, "dispatcher_oldest_held_job_age_seconds") == 0


async def test_readyz_is_503_once_consumers_are_detached(
        ops_dispatcher: RunningDispatcher) -> None:
    d = ops_dispatcher
    url = f"{d.settings.public_base_url}/readyz"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as r:
            assert r.status == 200
            assert (await r.json())["checks"] == {"database": True, "broker": True,
                                                   "consumers": True}
        assert d.service.consumer is not None
        await d.service.consumer.stop(1.0)
        async with session.get(url) as r:
            body = await r.json()
        async with session.get(f"{d.settings.public_base_url}/healthz") as alive:
            assert alive.status == 200
    assert r.status == 503
    assert body == {"ready": False, "checks": {"database": True, "broker": True,
                                               "consumers": False}}
    assert value(await scrape(d.settings.public_base_url), "dispatcher_consumers_attached") == 0


async def test_credits_granted_events_count_as_applied_duplicate_or_rejected(
        ops_dispatcher: RunningDispatcher) -> None:
    d = ops_dispatcher
    account = await d.funded_account(uid("t"), 0)
    grant = CreditsGranted(account=account, amount=25, kind="auto_recharge",
                           payment_reference=uid("pay"))
    connection = await aio_pika.connect(d.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        billing = await channel.get_exchange(Names(d.settings.amqp_prefix).billing_exchange)
        for body in (encode_event(grant), encode_event(grant), b'{"type": "credits.granted"}'):
            await billing.publish(aio_pika.Message(body), routing_key="credits.granted")

    def counted(m: Samples) -> bool:
        return (value(m, "dispatcher_topups_total", result="applied") == 1
                and value(m, "dispatcher_topups_total", result="duplicate") == 1
                and value(m, "dispatcher_topups_total", result="rejected") == 1
                and value(m, "dispatcher_credits_total", operation="granted") == 25)
    await settle(d, counted)
    assert (await CreditStore(d.pool).balance(account)).available == 25
