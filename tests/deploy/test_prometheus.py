"""A real Prometheus (Debian's, started privately by scripts/dev-prometheus) scrapes a
running App (``python -m strictconsume ... --http``) on a private broker node: every
query of the dashboard returns data, and the consumer-not-ready alert fires while
the broker is stopped.

The outbox's series (``strictconsume_outbox_*``, which the outbox exports) come from
a second target, a prometheus-client server in the test exporting them under those
names, so that the dashboard's outbox queries run against real samples too.

The alert rules are deploy/prometheus/alerts.yml with one change, checked below: the
``for:`` of StrictconsumeNotReady is 2 s instead of 2 minutes, so that the test takes
seconds; promtool's unit tests (test_alerts.py) pin the rule's real timing. The App
runs on trio only: what Prometheus sees does not depend on the backend, and the
metrics are rendered by the same code on both (tests/framework/test_observability.py,
test_queue_stats.py).
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import prometheus_client
import pytest

from ..amqp.oracle import pika_channel
from ..conftest import REPO, dev_broker
from ..processes import Harness, Node
from .promtool import ALERTS, ensure_prometheus
from .test_alerts import dashboard_queries

# about 30 s, a private broker node's start included
pytestmark = [pytest.mark.services, pytest.mark.slow]

DEV_PROMETHEUS = REPO / "scripts" / "dev-prometheus"
#: What Grafana puts in the dashboard's variables, for a query run by hand.
RATE_INTERVAL = "1m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def outbox_exporter() -> Iterator[str]:
    """``HOST:PORT`` of a prometheus-client server exporting the outbox's series."""
    registry = prometheus_client.CollectorRegistry()
    lag = prometheus_client.Gauge(
        "strictconsume_outbox_lag_seconds", "Age of the oldest pending row.", registry=registry
    )
    published = prometheus_client.Counter(
        "strictconsume_outbox_published", "Rows published.", registry=registry
    )
    failed = prometheus_client.Counter(
        "strictconsume_outbox_failed", "Publishes refused.", registry=registry
    )
    lag.set(0.5)
    published.inc(10)
    failed.inc(0)
    port = free_port()
    server, thread = prometheus_client.start_http_server(port, "127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[list[str]]:
    """The arguments of scripts/dev-prometheus for a server of this test's own
    (stopped and deleted afterwards)."""
    if os.environ.get("STRICTCONSUME_PROMETHEUS_URL"):
        pytest.skip("configures its own scrape targets; STRICTCONSUME_PROMETHEUS_URL is set")
    ensure_prometheus()
    port = os.environ.get("STRICTCONSUME_PROMETHEUS_PORT") or str(free_port())
    args = [sys.executable, str(DEV_PROMETHEUS), "--name", f"t{uuid.uuid4().hex[:8]}"]
    args += ["--port", port]
    try:
        yield args
    finally:
        subprocess.run([*args, "purge"], check=False, timeout=60)


def fast_rules(directory: Path) -> Path:
    """alerts.yml with StrictconsumeNotReady's ``for: 2m`` as ``for: 2s``."""
    text = ALERTS.read_text()
    rule = re.search(r"- alert: StrictconsumeNotReady\n(?:.*\n)*?        for: 2m\n", text)
    assert rule is not None
    fast = text[: rule.end()].removesuffix("for: 2m\n") + "for: 2s\n" + text[rule.end() :]
    assert fast.count("for: 2s") == 1
    path = directory / "alerts.yml"
    path.write_text(fast)
    return path


def query(client: httpx.Client, base: str, expr: str) -> list[dict[str, Any]]:
    response = client.get(f"{base}/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def publish(url: str, queue: str, bodies: list[bytes]) -> None:
    with pika_channel(url) as ch:
        ch.confirm_delivery()
        for body in bodies:
            properties = pika.BasicProperties(timestamp=int(time.time()) - 3)
            ch.basic_publish("", queue, body, properties, mandatory=True)


def firing(client: httpx.Client, base: str, alert: str) -> list[dict[str, Any]]:
    alerts = client.get(f"{base}/api/v1/alerts").json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]


def test_prometheus_scrapes_the_app_and_the_not_ready_alert_fires_while_the_broker_is_down(
    own_node: Node, prometheus: list[str], outbox_exporter: str, tmp_path: Path
) -> None:
    queue = f"sc-prometheus-{uuid.uuid4().hex[:8]}"
    http_port = free_port()
    harness = Harness(own_node.url, queue, tmp_path)
    try:
        app = harness.start(
            "trio",
            "--http",
            f"127.0.0.1:{http_port}",
            "--queue-stats-interval",
            "1",
            target="tests.deploy.metrics_app:app",
            env={"METRICS_APP_QUEUE": queue},
        )
        app.wait_for(lambda: "ready: consuming" in app.log(), 20, "the App ready")
        started = subprocess.run(
            [
                *prometheus,
                "start",
                "--target",
                f"127.0.0.1:{http_port}",
                "--target",
                outbox_exporter,
                "--rules",
                str(fast_rules(tmp_path)),
                "--interval",
                "1s",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert started.returncode == 0, started.stderr
        base = started.stdout.strip()
        with httpx.Client(timeout=10) as client:
            # published once scraped, so that Prometheus sees the counters rise
            wait(lambda: bool(query(client, base, "strictconsume_ready")), "a first scrape")
            time.sleep(1)
            publish(own_node.url, queue, [b"ok"] * 20 + [b"fail"] * 2)

            def scraped() -> bool:
                dead = query(client, base, f'strictconsume_queue_messages{{queue="{queue}.dlq"}}')
                acked = query(
                    client, base, f'strictconsume_messages_total{{queue="{queue}",outcome="ack"}}'
                )
                return bool(dead and dead[0]["value"][1] == "2") and bool(
                    acked and acked[0]["value"][1] == "20"
                )

            wait(scraped, "the dead letters and acks scraped")
            time.sleep(3)  # a few more scrapes, so that every rate() has its two samples
            empty = []
            for title, expr in dashboard_queries():
                concrete = expr.replace("$__rate_interval", RATE_INTERVAL)
                concrete = concrete.replace("$queue", queue)  # letters, digits, dashes
                result = query(client, base, concrete)
                if not result:
                    empty.append((title, concrete))
                for sample in result:
                    assert math.isfinite(float(sample["value"][1])), (title, concrete, sample)
            assert empty == []
            assert firing(client, base, "StrictconsumeNotReady") == []
            ready = query(client, base, "strictconsume_ready")
            assert [s["value"][1] for s in ready] == ["1"]

            dev_broker(*own_node.args, "stop")
            stopped_at = time.monotonic()
            wait(
                lambda: bool(firing(client, base, "StrictconsumeNotReady")),
                "StrictconsumeNotReady firing",
            )
            print(
                f"StrictconsumeNotReady fired {time.monotonic() - stopped_at:.1f} s after the stop"
            )
            (alert,) = firing(client, base, "StrictconsumeNotReady")
            assert alert["labels"] == {
                "alertname": "StrictconsumeNotReady",
                "instance": f"127.0.0.1:{http_port}",
                "job": "strictconsume",
                "severity": "page",
            }
            # the counts are not known without a connection: their series are gone
            assert query(client, base, f'strictconsume_queue_messages{{queue="{queue}"}}') == []
        app.send(signal.SIGTERM)
        code, _ = app.wait_exit(30)
        assert code == 0, app.tail()
    finally:
        harness.close()
