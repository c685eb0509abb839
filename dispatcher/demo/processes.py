"""The demo's child processes: start each with its own environment and log file, stop them all.

Children stay in the demo's process group, so a Ctrl-C in the terminal reaches them too; the
demo still stops each one itself (SIGTERM, then SIGKILL past a grace period) and waits for it,
so nothing it started outlives it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

STOP_GRACE_SECONDS = 15.0


class ChildFailed(Exception):
    """A child process exited early or did not become ready in time."""


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(overrides: Mapping[str, str], *, drop_prefixes: tuple[str, ...]) -> dict[str, str]:
    """This process's environment without the given prefixes, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env.update(overrides)
    return env


@dataclass
class Child:
    """One child process and the file its output goes to."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            # Our own interpreter and a fixed module name: nothing here comes from a user.
            self.proc = subprocess.Popen(  # noqa: S603
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "start() first"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM, wait up to ``grace``, then SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return await asyncio.to_thread(proc.wait, grace)
            except subprocess.TimeoutExpired:
                proc.kill()
        return await asyncio.to_thread(proc.wait)


@dataclass
class Children:
    """Every child the demo started, stopped in reverse order of starting."""

    log_dir: Path
    started: list[Child] = field(default_factory=list)

    def start(self, name: str, module: str, args: list[str], env: dict[str, str]) -> Child:
        child = Child(name, [sys.executable, "-m", module, *args], env,
                      self.log_dir / f"{name}.log")
        child.start()
        self.started.append(child)
        return child

    async def wait_ready(self, child: Child, ready: Callable[[], Awaitable[bool]],
                         within: float = 30.0) -> None:
        """Poll ``ready`` until true; fail at once if the child exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            if not child.running():
                raise ChildFailed(f"{child.name} exited early:\n{child.log_tail()}")
            if await ready():
                return
            await asyncio.sleep(0.1)
        raise ChildFailed(f"{child.name} was not ready within {within:.0f}s:\n"
                          f"{child.log_tail()}")

    def check_alive(self) -> None:
        """Raise if a child died while the demo still needs it."""
        for child in self.started:
            if not child.running():
                raise ChildFailed(f"{child.name} stopped unexpectedly:\n{child.log_tail()}")

    async def stop_all(self) -> dict[str, int | None]:
        """Stop every child, newest first; returns their exit codes by name."""
        codes: dict[str, int | None] = {}
        for child in reversed(self.started):
            codes[child.name] = await child.stop()
        return codes
