"""The README's "Run it yourself" section, run as written: every bash and python block, in order,
in one shell, with this run's own database, AMQP prefix and ports in the variables it reads."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import asyncpg
from aiohttp.test_utils import unused_port

from dispatcher.events.topology import Names, delete_all
from dispatcher.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL
from tests.acceptance.process import ROOT

SECTION = "## Run it yourself"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SERVER_URL = DEFAULT_DATABASE_URL.rsplit("/", 1)[0]


def section_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the section, in order."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"\n{SECTION}\n")
    end = readme.index("\n## ", start + len(SECTION) + 2)
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(readme[start:end])]


def as_one_script(blocks: list[tuple[str, str]]) -> str:
    """Bash blocks as they are; a python block fed to ``python -``, as the README says."""
    parts = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for language, code in blocks:
        if language == "python":
            parts.append(f"python - <<'README_PYTHON'\n{code}README_PYTHON")
        else:
            parts.append(code)
    return "\n".join(parts) + "\n"


def test_the_section_has_only_runnable_blocks() -> None:
    blocks = section_blocks()
    assert {language for language, _ in blocks} == {"bash", "python"}
    assert len(blocks) >= 6


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{SERVER_URL}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _delete_topology(prefix: str) -> None:
    connection = await aio_pika.connect(DEFAULT_AMQP_URL)
    try:
        await delete_all(await connection.channel(), Names(prefix))
    finally:
        await connection.close()


def test_run_it_yourself_as_written(tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex[:10]
    database, prefix = f"readme_{run_id}", f"readme{run_id}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DISPATCHER_DATABASE_URL": f"{SERVER_URL}/{database}",
        "DISPATCHER_AMQP_PREFIX": prefix,
        "DISPATCHER_HTTP_PORT": str(unused_port()),
        "SANDBOX_PORT": str(unused_port()),
    })
    script = tmp_path / "run-it-yourself.sh"
    script.write_text(as_one_script(section_blocks()), encoding="utf-8")
    log = tmp_path / "output.txt"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            asyncio.run(_delete_topology(prefix))
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    output = log.read_text(encoding="utf-8", errors="replace")
    assert code == 0, output[-5000:]
    assert "status.sms.sent" in output and "status.sms.delivered" in output, output[-5000:]
    assert '"available": 99' in output, output[-5000:]  # one GB segment at the default rate
