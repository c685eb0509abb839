"""A real Prometheus server (Debian's) scrapes a running dispatcher; its query API sees our metrics.

``make test`` installs the binary first (``scripts/system-deps``), so this test never skips.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.dispatcher_fixture import RunningDispatcher, free_port, wait_for
from tests.integration.ops_fixture import ops_dispatcher

__all__ = ["ops_dispatcher"]

SCRAPE_CONFIG = """\
global:
  scrape_interval: 500ms
  evaluation_interval: 1s
scrape_configs:
  - job_name: dispatcher
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
"""


@pytest.fixture
def prometheus_server(ops_dispatcher: RunningDispatcher, tmp_path: Path) -> Iterator[str]:
    """Prometheus on a free loopback port, scraping the dispatcher every 0.5 s."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: run scripts/system-deps (make test does)"
    port = ops_dispatcher.settings.http_port
    config = tmp_path / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(target=f"127.0.0.1:{port}"))
    listen = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={listen}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://{listen}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


async def query(base_url: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector ``promql`` evaluates to (empty until scraped)."""
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"{base_url}/api/v1/query", params={"query": promql}) as r:
            if r.status != 200:
                return []
            body = await r.json()
    except aiohttp.ClientError:
        return []  # still starting
    assert body["status"] == "success"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_the_dispatcher_and_answers_queries_about_it(
        ops_dispatcher: RunningDispatcher, prometheus_server: str) -> None:
    d = ops_dispatcher
    account = await d.funded_account(f"prom-{uuid.uuid4().hex[:8]}", 10)
    for i in range(3):
        await d.publish_sms(f"{account}-{i}", account)

    async def up() -> bool:
        return [r["value"][1] for r in await query(prometheus_server, "up")] == ["1"]
    await wait_for(up, timeout=30)

    async def three_sent() -> bool:
        rows = await query(prometheus_server,
                           'dispatcher_jobs_total{kind="sms",outcome="sent"}')
        return [r["value"][1] for r in rows] == ["3"]
    await wait_for(three_sent, timeout=30)

    consumers = await query(prometheus_server, "dispatcher_consumers_attached")
    assert [(r["metric"]["job"], r["value"][1]) for r in consumers] == [("dispatcher", "2")]
    # A histogram arrives with its buckets, and PromQL can aggregate them.
    p99 = await query(prometheus_server,
                      "histogram_quantile(0.99, sum by (le) (dispatcher_send_seconds_bucket))")
    assert len(p99) == 1 and float(p99[0]["value"][1]) > 0
    # No per-account, phone or job label ever reaches Prometheus.
    labels = {k for r in await query(prometheus_server, '{__name__=~"dispatcher_.+"}')
              for k in r["metric"]}
    assert labels <= {"__name__", "instance", "job", "kind", "outcome", "reason", "operation",
                      "type", "code_class", "result", "listener", "status", "loop", "action", "le"}
