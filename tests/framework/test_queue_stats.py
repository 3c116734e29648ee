"""Queue depth, consumers and message age (``_queue_stats.py``).

Without a broker: the queues watched, the age histogram on a fixed wall clock, the
setting, the series rendered through the App's ASGI app. Against the real broker
(pika publishes and is the oracle): the polled counts of a queue, its ``.dlq`` and
retry queue, the age of timestamped messages, a watched queue deleted under the App
(its series goes, the consumer goes on undisturbed), and the counts absent once the
App stopped. ``tests/deploy/test_prometheus.py`` scrapes them with a real Prometheus.
"""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pika
import pytest

import strictconsume as sc
from strictconsume._consumer import SPEC_ATTRIBUTE
from strictconsume._queue_stats import AGE_BUCKETS, QueueStats, watched_queues
from strictconsume._settings import resolve_settings
from strictconsume.amqp import Properties, Timestamp

from ..amqp.oracle import Oracle, pika_channel
from .polling import wait_until
from .test_observability import call, families

pytestmark = pytest.mark.anyio


def _spec(queue: str, delays: tuple[float, ...] = (1.0, 10.0)) -> sc.ConsumerSpec:
    @sc.consumer(queue, retry=sc.Retry(delays=delays))
    async def handle(msg: sc.Message) -> None:
        pass

    spec = getattr(handle, SPEC_ATTRIBUTE)
    assert isinstance(spec, sc.ConsumerSpec)
    return spec


def test_the_queues_watched_are_each_queue_its_dlq_and_its_retry_queues() -> None:
    specs = [_spec("orders", (1.0, 10.0, 1.0)), _spec("mail", ())]
    assert watched_queues(specs) == (
        "orders",
        "orders.dlq",
        "orders.retry.1000",
        "orders.retry.10000",
        "mail",
        "mail.dlq",
    )


def _message(queue: str, timestamp: Any) -> sc.Message:
    return sc.Message(
        body=b"x",
        properties=Properties(timestamp=timestamp),
        delivery_tag=1,
        redelivered=False,
        exchange="",
        routing_key=queue,
        queue=queue,
        attempt=1,
    )


def test_the_age_is_the_wall_clock_minus_the_timestamp() -> None:
    now = 1_800_000_000.0
    stats = QueueStats(wall_clock=lambda: now)
    stats.watch([_spec("orders")])
    published = datetime.datetime.fromtimestamp(now - 45, datetime.UTC)
    stats.message_started(_message("orders", published))
    stats.message_started(_message("orders", published.replace(tzinfo=None)))  # naive: UTC
    stats.message_started(_message("orders", None))  # no timestamp: not observed
    stats.message_started(_message("orders", Timestamp(2**63 - 1)))  # "never": not a time
    future = datetime.datetime.fromtimestamp(now + 3600, datetime.UTC)
    stats.message_started(_message("orders", future))  # clocks apart: 0
    histogram = stats.ages["orders"]
    assert histogram.count == 3
    assert histogram.total == 90.0
    cumulative = dict(histogram.cumulative())
    assert cumulative[1.0] == 1  # the future one
    assert cumulative[30.0] == 1
    assert cumulative[60.0] == 3
    assert histogram.bounds == AGE_BUCKETS


def test_the_interval_is_a_setting_from_code_environment_and_command_line() -> None:
    assert resolve_settings({}, {}).queue_stats_interval == 15.0
    assert resolve_settings({"queue_stats_interval": 2}, {}).queue_stats_interval == 2.0
    environ = {"STRICTCONSUME_QUEUE_STATS_INTERVAL": "5"}
    assert resolve_settings({"queue_stats_interval": 2}, environ).queue_stats_interval == 5.0
    command_line = {"queue_stats_interval": 0}
    assert resolve_settings({}, environ, command_line).queue_stats_interval == 0.0
    with pytest.raises(sc.SettingsError, match=r"STRICTCONSUME_QUEUE_STATS_INTERVAL.*'-1'"):
        resolve_settings({}, {"STRICTCONSUME_QUEUE_STATS_INTERVAL": "-1"})
    with pytest.raises(sc.SettingsError, match=r"option --queue-stats-interval"):
        resolve_settings({}, {}, {"queue_stats_interval": "often"})


async def test_an_app_not_running_shows_ages_at_zero_and_no_counts() -> None:
    app = sc.App(queue_stats_interval=1.0)
    app.add_consumer(_spec("orders"))
    asgi = app.asgi()
    found = families((await call(asgi, "/metrics"))[2].decode())
    assert found["strictconsume_ready"] == {(): 0.0}
    assert "strictconsume_queue_messages" not in found  # never polled: not known
    assert "strictconsume_message_age_seconds_count" not in found  # watched once it runs


# -- against the broker ---------------------------------------------------------------


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    name = f"sc-stats-{uuid.uuid4().hex}"
    yield name
    oracle = Oracle(broker_url)
    for suffix in ("", ".dlq", ".retry.60000"):
        oracle.delete_now(name + suffix)


def _publish_timestamped(url: str, queue: str, bodies: list[bytes], age: int) -> None:
    with pika_channel(url) as ch:
        ch.confirm_delivery()
        for body in bodies:
            properties = pika.BasicProperties(timestamp=int(time.time()) - age)
            ch.basic_publish("", queue, body, properties, mandatory=True)


@pytest.mark.broker
async def test_counts_and_ages_of_a_running_app(broker_url: str, queue: str) -> None:
    app = sc.App(url=broker_url, grace_period=1.0, queue_stats_interval=0.1)
    release = anyio.Event()
    handled: list[bytes] = []

    @app.consumer(queue, prefetch=1, retry=sc.Retry(delays=(60.0,)))
    async def handle(msg: sc.Message) -> None:
        handled.append(msg.body)
        await release.wait()

    oracle = Oracle(broker_url)
    asgi = app.asgi()

    async def scrape() -> dict[str, Any]:
        return families((await call(asgi, "/metrics"))[2].decode())

    def counts(found: dict[str, Any], name: str) -> dict[str, float]:
        return {dict(labels)["queue"]: value for labels, value in found.get(name, {}).items()}

    async with app.running():
        await anyio.sleep(0.5)  # five intervals, but nobody scraped: nothing asked
        assert app._queue_stats.counts == {}
        await anyio.to_thread.run_sync(
            _publish_timestamped, broker_url, queue, [b"a", b"b", b"c"], 40
        )

        async def polled() -> bool:
            found = await scrape()
            return counts(found, "strictconsume_queue_messages") == {
                queue: 2.0,  # one of the three is in the handler (unacked: not ready)
                f"{queue}.dlq": 0.0,
                f"{queue}.retry.60000": 0.0,
            }

        await wait_until(polled, what="the three queues polled")
        found = await scrape()
        assert counts(found, "strictconsume_queue_consumers") == {
            queue: 1.0,
            f"{queue}.dlq": 0.0,
            f"{queue}.retry.60000": 0.0,
        }
        assert found["strictconsume_ready"] == {(): 1.0}
        age = (("queue", queue),)
        assert found["strictconsume_message_age_seconds_count"][age] == 1.0
        assert 40.0 <= found["strictconsume_message_age_seconds_sum"][age] < 42.0
        bucket = {
            dict(labels)["le"]: value
            for labels, value in found["strictconsume_message_age_seconds_bucket"].items()
        }
        assert (bucket["30.0"], bucket["60.0"], bucket["+Inf"]) == (0.0, 1.0, 1.0)

        # A watched queue that goes away closes the statistics' channel only.
        await oracle.delete(f"{queue}.dlq")

        async def dlq_gone() -> bool:
            return f"{queue}.dlq" not in counts(await scrape(), "strictconsume_queue_messages")

        await wait_until(dlq_gone, what="the deleted .dlq's series gone")
        release.set()

        async def all_handled() -> bool:
            return len(handled) == 3 and app.outcomes[queue, "ack"] == 3

        await wait_until(all_handled, what="the three handled")
        assert app.ready
        assert await oracle.consumer_count(queue) == 1

        async def drained() -> bool:
            return counts(await scrape(), "strictconsume_queue_messages")[queue] == 0.0

        await wait_until(drained, what="the queue polled empty")
        found = await scrape()
        assert found["strictconsume_message_age_seconds_count"][age] == 3.0
    assert app.outcomes[queue, "ack"] == 3
    assert counts(await scrape(), "strictconsume_queue_messages") == {}  # not known now
