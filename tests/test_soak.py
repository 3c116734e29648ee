"""The soak's figures (``benchmarks/soak.py``): where warm-up ends, the RSS growth after
it, and the per-message maxima as multiples of the prefetch. Pure functions over
samples: no broker, no clock."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from soak import growth, proportion, warmup_end


def sample(unique: int, rss_kb: int, **more: Any) -> dict[str, Any]:
    return {"unique": unique, "rss_kb": rss_kb, **more}


def test_warm_up_ends_with_the_first_sample_past_the_share() -> None:
    samples = [sample(0, 30_000), sample(50, 34_000), sample(100, 36_000), sample(400, 36_100)]
    assert warmup_end(samples, total=1000, warmup=0.1) == 2
    assert warmup_end(samples, total=1000, warmup=0.5) is None


def test_growth_is_the_last_sample_over_the_warm_up_end() -> None:
    samples = [
        sample(0, 20_000),  # start-up: not counted
        sample(100, 40_000),  # warm-up end
        sample(500, 43_000),  # a peak after warm-up
        sample(1000, 41_000),
    ]
    found = growth(samples, total=1000, warmup=0.1)
    assert found["warmup_index"] == 1
    assert found["rss_warm_kb"] == 40_000
    assert found["rss_end_kb"] == 41_000
    assert found["growth_pct"] == 2.5
    assert found["max_after_kb"] == 43_000
    assert found["max_growth_pct"] == 7.5


def test_the_slope_is_kb_per_100k_messages_after_warm_up() -> None:
    # 10 KB more per 1,000 messages, steadily: 1,000 KB per 100,000
    samples = [sample(0, 5_000)] + [sample(n, 30_000 + n // 100) for n in range(100, 1100, 100)]
    found = growth(samples, total=1000, warmup=0.1)
    assert found["slope_kb_per_100k"] == 1000.0
    assert found["growth_pct"] == pytest.approx(100 * 9 / 30_001, abs=0.01)


def test_no_growth_figure_without_a_sample_after_warm_up() -> None:
    samples = [sample(0, 20_000), sample(50, 30_000), sample(120, 31_000)]
    found = growth(samples, total=1000, warmup=0.1)
    assert found["warmup_index"] == 2
    assert found["growth_pct"] is None
    assert growth([], total=1000, warmup=0.1)["growth_pct"] is None


def test_proportion_to_the_prefetch() -> None:
    samples = [
        sample(0, 1, tracker_max=40, running_max=3, inflight_max=40, objects={"Delivery": 41}),
        sample(9, 1, tracker_max=100, running_max=None, inflight_max=97, objects={"Message": 2}),
    ]
    found = proportion(samples, prefetch=100)
    assert found["tracker_max"] == 100
    assert found["running_max"] == 3  # a sample that could not read it is left out
    assert found["Delivery_max"] == 41
    assert found["Message_max"] == 2
    assert found["per_prefetch"]["tracker_max"] == 1.0
    assert found["per_prefetch"]["Delivery_max"] == 0.41
    assert found["Ack_max"] == 0
