"""Run ``dispatcher run`` as a real OS process, configured for one test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.request import urlopen

from dispatcher.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    for f in fields(settings):
        env[f"DISPATCHER_{f.name.upper()}"] = str(getattr(settings, f.name))
    return env


@dataclass
class DispatcherProcess:
    """One ``dispatcher run`` subprocess and its log file."""

    settings: Settings
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dispatcher", "run"], cwd=ROOT,
                                         env=settings_env(self.settings), stdout=log,
                                         stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with urlopen(f"{self.settings.public_base_url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("dispatcher did not become ready:\n"
                             + self.log_path.read_text()[-3000:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
