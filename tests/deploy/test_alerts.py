"""deploy/prometheus/alerts.yml and deploy/grafana/strictconsume.json, checked offline
with Debian's promtool: the rules are valid, every alert has unit tests that make it
fire and that keep it quiet, the unit tests pass, and they fail when a rule is
broken (so they test something). The dashboard's queries are run against a real
Prometheus in test_prometheus.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .promtool import ALERT_TESTS, ALERTS, DASHBOARD, promtool

pytestmark = pytest.mark.services


def _alerts() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {
        rule["alert"]: rule
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert len(alerts) >= 10
    assert fired == alerts
    assert quiet == alerts
    required = {
        "StrictconsumeNotReady",
        "StrictconsumeNoConsumer",
        "StrictconsumeDeadLettersGrowing",
        "StrictconsumeBacklogGrowing",
        "StrictconsumeHandlerErrors",
        "StrictconsumeHandlerSlow",
        "StrictconsumeReconnecting",
        "StrictconsumeOutboxLagging",
    }
    assert required <= alerts
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in ("page", "warning"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_the_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("StrictconsumeNotReady", "strictconsume_ready == 0", "strictconsume_ready == 1"),
        ("StrictconsumeHandlerErrors", "> 0.05", "> 0.5"),
        ("StrictconsumeOutboxLagging", "strictconsume_outbox_lag_seconds) > 60", "x) > 60"),
    ],
)
def test_a_broken_rule_fails_its_unit_tests(tmp_path: Path, alert: str, old: str, new: str) -> None:
    text = ALERTS.read_text()
    assert text.count(old) == 1
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts.test.yml")
    result = promtool("test", "rules", str(tmp_path / "alerts.test.yml"))
    assert result.returncode == 1
    assert f"alertname: {alert}" in result.stdout + result.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
    ]


def test_the_dashboard_queries_every_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "strictconsume"
    names = {
        "strictconsume_ready",
        "strictconsume_connected",
        "strictconsume_reconnects_total",
        "strictconsume_messages_total",
        "strictconsume_handler_seconds_bucket",
        "strictconsume_inflight",
        "strictconsume_consumer_timeouts_total",
        "strictconsume_queue_messages",
        "strictconsume_queue_consumers",
        "strictconsume_message_age_seconds_bucket",
        "strictconsume_outbox_lag_seconds",
        "strictconsume_outbox_published_total",
        "strictconsume_outbox_failed_total",
    }
    text = " ".join(expr for _, expr in dashboard_queries())
    assert {name for name in names if name not in text} == set()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
