"""Benchmark: a 100k-recipient broadcast for one account, end to end to the sandbox.

``python -m bench.broadcast [--recipients 100000] [--ceiling 100000] [--profile] [--write]``

Beside it, in the same run, the broker ceiling: raw aio-pika, publish 100k persistent messages
(publisher confirms) to a quorum queue, then consume and ack them (prefetch 1000, acks with
``multiple``). The broadcast: ``POST /v1/accounts/{a}/broadcasts`` to a ``dispatcher run``
subprocess whose Twilio client points at a ``python -m dispatcher.sandbox`` subprocess (zero
latency, status callbacks on); recipients/s is billable recipients over the time from the POST
until the broadcast is ``completed`` (every recipient accepted by the sandbox); the time until
every delivery callback is settled is reported too. ``audit`` must be clean afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg

from bench.broadcast_dbstats import database_stats, format_stats, track_functions
from bench.broadcast_procs import (
    ROOT,
    Child,
    bench_settings,
    cpu_seconds,
    dispatcher_child,
    drop_database,
    free_port,
    memory_kib,
    out_dir,
    personalised,
    replace_section,
    sandbox_child,
    scratch_database,
)
from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.settings import Settings
from dispatcher.tokens import create_token

HEADING = "Broadcast end to end (issue 5, `bench/broadcast.py`)"
CAUSES = """
**The floor row settles it on this machine.** `bench/broadcast_floor.py` does only what no
broadcast can skip: one `messages.create_async` of the official twilio library a recipient
(the dispatcher's own HTTP client, 150 in flight like the runner's window) and the three signed
status callbacks the provider sends for it, read, signature-checked (one HMAC) and answered.
No pre-flight, no database, no reservation, no settlement, no events, no logs. In the same run
that alone reached 0.45 of the ceiling (2026-12-02 02:30, Intel host: 1,121 recipients/s
against 2,472 msg/s; 0.88 ms CPU a recipient in the floor process plus 0.74 ms in the
sandbox): the 0.5 target is below what the fixed parts allow on 2 shared cores, before any of
the work that makes a broadcast correct. The dispatcher's own figure (383/s, 0.15) is the
floor's work plus, per recipient, its share of a batched reservation, the settlement of three
callbacks, two status events through the outbox and the progress counts: 1.96 ms in the
dispatcher and 1.54 ms in PostgreSQL on this (slower) host. `emit_job_event` is plpgsql now
(migration 0012; 155 -> 50 µs a call measured in one run, `bench/emit_job_event_cost.py`).
Earlier (2026-12-02, AMD EPYC host): 541 recipients/s at 100k, 0.11 of 4,917; dispatcher
1.27 ms, sandbox 0.58 ms, PostgreSQL 1.16 ms a recipient. What changed then: callbacks settle
through a group commit (one HMAC per valid signature); released payloads are not re-validated;
no asyncpg reset per pooled release; batches are claimed by seq range; plans made on empty
tables no longer full-scan `jobs` and `reservations`; progress reads kept counts; one `sent`
event per job. Closing the gap needs more cores (several dispatcher processes as competing
consumers scale; the database arbitrates credits) or a provider API with fewer round trips per
message.
"""
BODY = "Hi {name}, your code is {code}. Show it at the till for 20% off this week."
ACCOUNT = "bench-broadcast"
SANDBOX_SID = "AC" + "b" * 32
SANDBOX_TOKEN = "bench-sandbox-token"


async def broker_ceiling(amqp_url: str, count: int) -> dict[str, float]:
    """Raw aio-pika: publish ``count`` confirmed persistent messages, then consume and ack."""
    connection = await aio_pika.connect_robust(amqp_url)
    name = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"schema_version": 1, "id": "x" * 40, "kind": "sms", "account": ACCOUNT,
                       "to": "+14155550100", "body": BODY, "from": "+14155550199"}).encode()
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(name, durable=True,
                                            arguments={"x-queue-type": "quorum"})
        started = time.perf_counter()
        window = 1000
        for start in range(0, count, window):
            await asyncio.gather(*(channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=name) for _ in range(min(window, count - start))))
        published = time.perf_counter() - started
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=window)
        consume_queue = await consume_channel.get_queue(name)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            seen += 1
            if seen % 100 == 0 or seen == count:
                await message.ack(multiple=True)
            if seen == count:
                done.set()

        consumed_at = time.perf_counter()
        await consume_queue.consume(on_message)
        await done.wait()
        consumed = time.perf_counter() - consumed_at
        await queue.delete(if_unused=False, if_empty=False)
    total = published + consumed
    return {"publish_s": published, "consume_s": consumed, "total_s": total,
            "per_second": count / total}


async def floor(sandbox_port: int, sandbox_pid: int, count: int, log: Path) -> dict[str, float]:
    """``bench.broadcast_floor`` in its own process: creates and their callbacks, nothing else."""
    argv = [sys.executable, "-m", "bench.broadcast_floor", "--count", str(count),
            "--port", str(free_port()), "--twilio-base-url", f"http://127.0.0.1:{sandbox_port}",
            "--account-sid", SANDBOX_SID, "--auth-token", SANDBOX_TOKEN]
    sandbox_before = cpu_seconds(sandbox_pid)
    with log.open("ab") as err:
        out = await asyncio.to_thread(subprocess.run, argv, cwd=ROOT, check=True,
                                      stdout=subprocess.PIPE, stderr=err, timeout=900)
    result: dict[str, float] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    result["sandbox_cpu_seconds"] = cpu_seconds(sandbox_pid) - sandbox_before
    return result


async def _reset_sandbox(port: int) -> None:
    """Forget the floor's creates, so the sandbox holds only the broadcast's."""
    async with (aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{port}/_sandbox/reset", json={}) as resp):
        resp.raise_for_status()


async def _prepare(pool: asyncpg.Pool, recipients: int) -> str:
    await create_account(pool, ACCOUNT)
    await CreditStore(pool).grant(ACCOUNT, recipients * 4, "purchase", "bench-seed")
    return await create_token(pool, ACCOUNT, "owner")


async def _progress(session: aiohttp.ClientSession, url: str,
                    headers: dict[str, str]) -> dict[str, Any]:
    async with session.get(url, headers=headers) as resp:
        return dict(await resp.json())


async def postgres_cpu(pool: asyncpg.Pool) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend serving the dispatcher's connections."""
    pids = await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                            " AND application_name = 'dispatcher'")
    found: dict[int, float] = {}
    for row in pids:
        with contextlib.suppress(OSError):
            found[row["pid"]] = cpu_seconds(row["pid"])
    return found


async def run_broadcast(base_url: str, token: str, people: list[dict[str, Any]],
                        dispatcher_pid: int, sandbox_pid: int, pool: asyncpg.Pool,
                        settle_limit_s: float = 120.0) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    raw = json.dumps({"body": BODY, "recipients": people, "from": "+14155550199"}).encode()
    cpu_before, sandbox_cpu_before = cpu_seconds(dispatcher_pid), cpu_seconds(sandbox_pid)
    postgres_before = await postgres_cpu(pool)
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(f"{base_url}/v1/accounts/{ACCOUNT}/broadcasts", data=raw,
                                headers={**headers, "Idempotency-Key": "bench-1"}) as resp:
            accepted = await resp.json()
            assert resp.status == 202, accepted
        submitted = time.perf_counter() - started
        url = f"{base_url}/v1/accounts/{ACCOUNT}/broadcasts/{accepted['broadcast_id']}"
        samples: list[tuple[float, int]] = []
        completed_s: float | None = None
        settled_s: float | None = None
        # Each poll counts the broadcast's jobs on the dispatcher's database: at 100k
        # recipients, poll every 2 s so the probe stays a small share of what is measured.
        poll_s = max(1.0, len(people) / 50_000)
        while settled_s is None:
            await asyncio.sleep(poll_s)
            found = await _progress(session, url, headers)
            now = time.perf_counter() - started
            samples.append((now, found["sent"] + found["delivered"] + found["failed"]))
            if completed_s is None and found["status"] == "completed":
                completed_s = now
            if completed_s is not None and found["sent"] == found["sending"] == 0:
                settled_s = now
            elif completed_s is not None and now > completed_s + settle_limit_s:
                break
    billable = accepted["preflight"]["billable"]
    assert completed_s is not None
    postgres_after = await postgres_cpu(pool)
    return {"billable": billable, "submit_s": submitted, "completed_s": completed_s,
            "settled_s": settled_s, "per_second": billable / completed_s,
            "final": found, "cpu_s": cpu_seconds(dispatcher_pid) - cpu_before,
            "sandbox_cpu_s": cpu_seconds(sandbox_pid) - sandbox_cpu_before,
            "postgres_cpu_s": sum(cpu - postgres_before.get(pid, 0.0)
                                  for pid, cpu in postgres_after.items()),
            "peak_rss_mib": memory_kib(dispatcher_pid, "VmHWM") / 1024, "samples": samples}


async def bench(recipients: int, ceiling_messages: int, profile: bool, *,
                db_stats: bool = False, keep_db: bool = False) -> dict[str, Any]:
    base = Settings.from_env()
    scratch = await scratch_database(base, "broadcast")
    if db_stats:
        await track_functions(scratch)
    people = personalised(recipients)
    logs = out_dir()
    children: list[Child] = []
    try:
        pool = await asyncpg.create_pool(scratch.url, min_size=1, max_size=2)
        assert pool is not None
        token = await _prepare(pool, recipients)
        sandbox_port = free_port()
        sandbox = sandbox_child(sandbox_port, SANDBOX_SID, SANDBOX_TOKEN,
                                logs / "broadcast-sandbox.log")
        if profile:
            sandbox.argv[1:1] = ["-m", "cProfile", "-o", str(logs / "broadcast-sandbox.prof")]
        sandbox.start(f"http://127.0.0.1:{sandbox_port}/_sandbox/scenario")
        children.append(sandbox)
        settings = bench_settings(
            base, scratch, "broadcast", twilio_base_url=f"http://127.0.0.1:{sandbox_port}",
            twilio_account_sid=SANDBOX_SID, twilio_auth_token=SANDBOX_TOKEN,
            sender_rate_per_second=1e6, reconcile_grace_seconds=120.0)
        dispatcher = dispatcher_child(settings, logs / "broadcast-dispatcher.log")
        if profile:
            dispatcher.argv[1:1] = ["-m", "cProfile", "-o", str(logs / "broadcast.prof")]
        dispatcher.start(f"{settings.public_base_url}/healthz")
        children.append(dispatcher)
        ceiling = await broker_ceiling(base.amqp_url, ceiling_messages)
        bare = await floor(sandbox_port, sandbox.pid, recipients, logs / "broadcast-floor.log")
        await _reset_sandbox(sandbox_port)
        result = await run_broadcast(settings.public_base_url, token, people, dispatcher.pid,
                                     sandbox.pid, pool)
        violations = await run_audit(pool)
        stats = None
        if db_stats:
            dispatcher.stop()  # its backends flush their statistics as they exit
            stats = await database_stats(pool, result["billable"])
        await pool.close()
        return {"recipients": recipients, "ceiling": ceiling, "broadcast": result, "floor": bare,
                "floor_ratio": bare["per_second"] / ceiling["per_second"],
                "audit_violations": len(violations),
                "ratio": result["per_second"] / ceiling["per_second"], "db_stats": stats}
    finally:
        for child in reversed(children):
            child.stop()
        if keep_db:
            print(f"kept database {scratch.name}")
        else:
            await drop_database(scratch)


def report(r: dict[str, Any], command: str) -> str:
    b, c, f = r["broadcast"], r["ceiling"], r["floor"]
    verdict = "met" if r["ratio"] >= 0.5 else "missed"
    settled = (f"{b['settled_s']:.1f} s" if b["settled_s"] is not None else
               f"not within 120 s of completion ({b['final']['delivered']:,} delivered)")
    rows = [
        ("broker ceiling: raw aio-pika, publish with confirms to a quorum queue, then consume "
         f"and ack ({c['publish_s']:.1f} s + {c['consume_s']:.1f} s)",
         f"**{c['per_second']:,.0f} msg/s**"),
        ("floor: the same number of twilio creates (150 in flight) and their signed callbacks "
         "checked and answered, nothing else (`bench/broadcast_floor.py`)",
         f"**{f['per_second']:,.0f} recipients/s** ({r['floor_ratio']:.2f} of the ceiling; "
         f"{f['cpu_seconds'] * 1e3 / f['recipients']:.2f} ms CPU a recipient, sandbox "
         f"{f['sandbox_cpu_seconds'] * 1e3 / f['recipients']:.2f} ms)"),
        ("broadcast: submit (HTTP, pre-flight, COPY of the recipients)",
         f"{b['submit_s']:.1f} s"),
        ("broadcast: POST until `completed` (every recipient accepted by the sandbox)",
         f"{b['completed_s']:.1f} s"),
        ("broadcast throughput",
         f"**{b['per_second']:,.0f} recipients/s** ({r['ratio']:.2f} of the ceiling)"),
        ("until every delivery callback was settled", settled),
        ("dispatcher CPU during the broadcast",
         f"{b['cpu_s']:.0f} s ({b['cpu_s'] * 1e3 / b['billable']:.2f} ms a recipient)"),
        ("sandbox CPU meanwhile (its creates and signed callbacks)",
         f"{b['sandbox_cpu_s']:.0f} s ({b['sandbox_cpu_s'] * 1e3 / b['billable']:.2f} ms a "
         "recipient)"),
        ("PostgreSQL CPU meanwhile (the dispatcher's connections)",
         f"{b['postgres_cpu_s']:.0f} s ({b['postgres_cpu_s'] * 1e3 / b['billable']:.2f} ms a "
         "recipient)"),
        ("dispatcher peak RSS", f"{b['peak_rss_mib']:.0f} MiB"),
        ("`audit` violations afterwards", str(r["audit_violations"])),
    ]
    table = "\n".join(f"| {what} | {figure} |" for what, figure in rows)
    return f"""
`{command}`: one account, {r['recipients']:,} personalised recipients over 20 countries
(1 in 50 names with a CJK character), submitted in one `POST /v1/accounts/{{a}}/broadcasts`.
`python -m dispatcher run` and `python -m dispatcher.sandbox` (zero latency, status callbacks
on) as subprocesses; the benchmark process only posts and polls. All figures from the same
run, on the 2 shared cores.

| what | figure |
| --- | ---: |
{table}

Target: at least half the ceiling: **{verdict}**.
{CAUSES}"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.broadcast")
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--ceiling", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the dispatcher and the sandbox (bench/out/*.prof)")
    parser.add_argument("--db-stats", action="store_true",
                        help="print PostgreSQL buffer hits per index/table and time per function")
    parser.add_argument("--keep-db", action="store_true",
                        help="leave the scratch database for EXPLAIN (drop it yourself)")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    result = asyncio.run(bench(args.recipients, args.ceiling, args.profile,
                               db_stats=args.db_stats, keep_db=args.keep_db))
    stats = result.pop("db_stats")
    command = f"python -m bench.broadcast --recipients {args.recipients} --ceiling {args.ceiling}"
    text = report(result, command)
    print(json.dumps({**result, "broadcast": {**result["broadcast"], "samples": "…"}}, indent=1))
    print(text)
    if stats is not None:
        print(format_stats(stats))
    if args.write:
        replace_section(Path(ROOT, "bench", "RESULTS.md"), HEADING, text)


if __name__ == "__main__":
    main()
