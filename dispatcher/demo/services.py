"""Check that the local PostgreSQL and RabbitMQ answer before tests or the demo start."""

from __future__ import annotations

import socket
import sys
from urllib.parse import urlsplit

from dispatcher.settings import InvalidSetting, Settings

HINTS = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "RabbitMQ": "rabbitmq-server -detached",
}


def _reachable(url: str, default_port: int) -> tuple[str, int, bool]:
    # Several hosts (a cluster, a primary and its standby): the first one is checked.
    parts = urlsplit(url.split(",")[0])
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=3):
            return host, port, True
    except OSError:
        return host, port, False


def main() -> int:
    try:
        settings = Settings.from_env()
    except InvalidSetting as exc:
        print(f"error [invalid_setting]: {exc}", file=sys.stderr)
        return 2
    failed = False
    for name, url, port in (
        ("PostgreSQL", settings.database_url, 5432),
        ("RabbitMQ", settings.amqp_url, 5672),
    ):
        host, port, ok = _reachable(url, port)
        if not ok:
            failed = True
            print(f"{name} is not reachable at {host}:{port}. Start it with: {HINTS[name]}",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
