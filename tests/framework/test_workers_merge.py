"""How ``--workers`` merges its workers' metrics and reads its setting (no processes:
tests/framework/test_workers.py runs the real ones)."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from strictconsume._settings import SettingsError, resolve_settings
from strictconsume._workers import describe_exit, merge, render


def _exposition(ack: int, seconds: float, connected: int, inflight: int, queued: int) -> str:
    return f"""# HELP strictconsume_messages Messages handled.
# TYPE strictconsume_messages_total counter
strictconsume_messages_total{{outcome="ack",queue="q"}} {ack}
strictconsume_messages_created{{outcome="ack",queue="q"}} {100 + ack}
# HELP strictconsume_handler_seconds How long.
# TYPE strictconsume_handler_seconds histogram
strictconsume_handler_seconds_bucket{{le="0.1",queue="q"}} {ack}
strictconsume_handler_seconds_bucket{{le="+Inf",queue="q"}} {ack}
strictconsume_handler_seconds_count{{queue="q"}} {ack}
strictconsume_handler_seconds_sum{{queue="q"}} {seconds}
# HELP strictconsume_connected 1 while connected.
# TYPE strictconsume_connected gauge
strictconsume_connected {connected}
# HELP strictconsume_inflight Handlers running.
# TYPE strictconsume_inflight gauge
strictconsume_inflight{{queue="q"}} {inflight}
# HELP strictconsume_queue_messages Ready messages, by the broker.
# TYPE strictconsume_queue_messages gauge
strictconsume_queue_messages{{queue="q"}} {queued}
"""


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


Q = (("queue", "q"),)
ACK = ("strictconsume_messages_total", (("outcome", "ack"), ("queue", "q")))


def test_counters_and_histograms_sum_status_gauges_take_the_minimum_broker_ones_the_max() -> None:
    merged = render(merge([_exposition(3, 0.5, 1, 2, 40), _exposition(5, 0.25, 0, 1, 38)])).decode()
    values = _values(merged)
    assert values[ACK] == 8
    assert values[("strictconsume_messages_created", (("outcome", "ack"), ("queue", "q")))] == 103
    assert values[("strictconsume_handler_seconds_bucket", (("le", "0.1"), ("queue", "q")))] == 8
    assert values[("strictconsume_handler_seconds_count", Q)] == 8
    assert values[("strictconsume_handler_seconds_sum", Q)] == 0.75
    assert values[("strictconsume_connected", ())] == 0  # one worker is not connected
    assert values[("strictconsume_inflight", Q)] == 3
    assert values[("strictconsume_queue_messages", Q)] == 40  # one queue, not 78
    assert "# TYPE strictconsume_messages_total counter" in merged
    assert "# TYPE strictconsume_handler_seconds histogram" in merged


def test_a_retired_workers_counters_still_count_but_not_its_gauges() -> None:
    retired = [render(merge([], [_exposition(7, 1.0, 1, 4, 99)])).decode()]
    values = _values(render(merge([_exposition(2, 0.5, 1, 1, 10)], retired)).decode())
    assert values[ACK] == 9
    assert values[("strictconsume_handler_seconds_count", Q)] == 9
    assert values[("strictconsume_inflight", Q)] == 1
    assert values[("strictconsume_queue_messages", Q)] == 10
    assert values[("strictconsume_connected", ())] == 1


def test_no_worker_answering_gives_an_empty_exposition() -> None:
    assert render(merge([])) == b""


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"


def test_the_workers_setting() -> None:
    assert resolve_settings({}, {}).workers == 1
    assert resolve_settings({}, {"STRICTCONSUME_WORKERS": "3"}).workers == 3
    assert resolve_settings({}, {"STRICTCONSUME_WORKERS": "auto"}).workers == (os.cpu_count() or 1)
    assert resolve_settings({}, {"STRICTCONSUME_WORKERS": "3"}, {"workers": "2"}).workers == 2
    for bad in ("0", "two", "1.5"):
        with pytest.raises(SettingsError, match=r"STRICTCONSUME_WORKERS.*auto"):
            resolve_settings({}, {"STRICTCONSUME_WORKERS": bad})
