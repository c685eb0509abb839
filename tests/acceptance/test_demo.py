"""``python -m dispatcher demo`` in a subprocess: the whole flow, then nothing left running.

Run smaller than the default (600 recipients, top-ups of 350) to keep the suite quick; the
shape is the same: a top-up on the low-balance event, a pause at zero, a second top-up on the
depletion, resume, completion, a clean audit.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from dispatcher.settings import Settings
from tests.acceptance.process import ROOT

SMALL = ["--recipients", "600", "--amount", "350", "--timeout", "90"]


@pytest.fixture
def demo_database(settings: Settings) -> Iterator[str]:
    """A database name for the demo to recreate; dropped afterwards."""
    name = f"dispatcher_demo_{uuid.uuid4().hex[:8]}"
    yield name
    asyncio.run(_drop(settings.database_url, name))


async def _drop(url: str, name: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def start_demo(settings: Settings, database: str, out: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DISPATCHER_", "BILLING_"))}
    env["DISPATCHER_DATABASE_URL"] = settings.database_url
    env["DISPATCHER_AMQP_URL"] = settings.amqp_url
    with out.open("wb") as sink:
        # Its own session and process group: what it starts stays in that group.
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "demo", "--database", database, *SMALL],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def child_pids(output: str) -> list[int]:
    started = next(line for line in output.splitlines() if line.startswith("started "))
    return [int(pid) for pid in re.findall(r"\(pid (\d+)\)", started)]


def assert_nothing_left(proc: subprocess.Popen[bytes], output: str) -> None:
    logs = re.search(r"logs in (/\S+dispatcher-demo-\S+)", output)
    if logs:  # the demo keeps its children's logs for the user; a test run does not need them
        shutil.rmtree(logs[1], ignore_errors=True)
    pids = child_pids(output)
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process at all is left in the demo's group


async def queue_exists(amqp_url: str, name: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
    return True


def wait_for_line(out: Path, proc: subprocess.Popen[bytes], marker: str,
                  seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        if marker in text:
            return text
        assert proc.poll() is None, text
        time.sleep(0.1)
    raise AssertionError(f"{marker!r} never appeared:\n{out.read_text()}")


def test_the_demo_runs_the_whole_flow_and_leaves_nothing_running(
        settings: Settings, demo_database: str, tmp_path: Path) -> None:
    out = tmp_path / "demo.txt"
    proc = start_demo(settings, demo_database, out)
    try:
        code = proc.wait(timeout=110)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert code == 0, text
    for expected in ("pre-flight:", "600 billable, skipped 2 invalid, 1 opted out, 1 duplicate",
                     "advice: ok_with_auto_recharge", "auto top-up granted: +350 credits",
                     "paused at zero", "resumed: releasing held recipients",
                     "broadcast completed", "sent             600 of 600 billable "
                     "(600 delivered, 0 failed)", "credits spent    600",
                     "top-ups charged  2: +350, +350", "resumed by itself",
                     "ledger audit     OK",
                     'dispatcher_credits_total{operation="captured"} 600',
                     "/metrics", "nothing left running"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert_nothing_left(proc, text)
    prefix = re.search(r"AMQP prefix (demo-[0-9a-f]+)", text)
    assert prefix is not None
    for queue in ("bulk", "transactional", "credits", "billing-service"):
        assert not asyncio.run(queue_exists(settings.amqp_url, f"{prefix[1]}.{queue}"))


def test_ctrl_c_mid_broadcast_stops_everything_it_started(
        settings: Settings, demo_database: str, tmp_path: Path) -> None:
    out = tmp_path / "demo.txt"
    proc = start_demo(settings, demo_database, out)
    try:
        wait_for_line(out, proc, "published broadcast")
        # What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert code == 130, text
    assert "interrupted: stopping everything the demo started" in text
    assert "nothing left running" in text
    assert_nothing_left(proc, text)


def test_a_child_dying_mid_broadcast_fails_the_demo_and_stops_the_rest(
        settings: Settings, demo_database: str, tmp_path: Path) -> None:
    out = tmp_path / "demo.txt"
    proc = start_demo(settings, demo_database, out)
    try:
        text = wait_for_line(out, proc, "published broadcast")
        dispatcher_pid = child_pids(text)[2]
        os.kill(dispatcher_pid, signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert code == 1, text
    assert "demo failed: dispatcher stopped unexpectedly" in text
    assert "dispatcher (exit -9)" in text
    assert_nothing_left(proc, text)
