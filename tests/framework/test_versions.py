"""What differs between RabbitMQ versions, against the real broker of each version.

CI runs the broker suites against the machine's RabbitMQ (3.10 on Debian bookworm) and
against 4.3 (Debian sid, ``scripts/dev-broker --debian sid``); ``strictconsume._versions``
is what the App believes of each version, and the tests here (with ``test_quorum.py``
and the large-body cases of ``tests/faults/test_bad_input.py``) check that belief
against the broker at hand. The table of every difference, with the test that pins
each row, is in ``tests/README.md``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import anyio
import pytest

import strictconsume as sc
from strictconsume._versions import (
    consumer_timeout_cancels,
    consumer_timeout_enforced,
    transient_queues_deprecated,
)

from ..amqp.oracle import Oracle
from ..conftest import dev_broker, external_broker_url, free_node_port
from ..processes import Node
from .polling import DEADLINE, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.anyio]

GRACE = 5.0


@pytest.fixture
def queues(broker_url: str) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    oracle = Oracle(broker_url)
    for queue in made:
        for name in (queue, f"{queue}.dlq", f"{queue}.retry.1000"):
            oracle.delete_now(name)


def new_queue(queues: list[str]) -> str:
    queue = f"sc-versions-{uuid.uuid4().hex}"
    queues.append(queue)
    return queue


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


async def test_a_quorum_consumer_timeout_cancels_the_consumer_and_it_subscribes_again(
    broker_url: str,
    broker_version: tuple[int, int, int],
    queues: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From RabbitMQ 4.3 a quorum delivery held past ``consumer_timeout=`` (sent as
    x-consumer-timeout) makes the broker cancel the consumer and take the message
    back, with the channel left open: the App counts and logs it once, naming the
    message, lets the handler finish, subscribes again, and nothing stays unacked.

    Before 4.3 the broker checks its consumer timeouts on a periodic tick (about a
    minute) and closes the channel; that path is pinned by the fake-broker test
    ``test_a_consumer_timeout_before_rabbitmq_4_3_closes_the_channel``."""
    if not consumer_timeout_cancels(broker_version):
        pytest.skip(f"RabbitMQ {broker_version} closes the channel on a periodic check")
    queue = new_queue(queues)
    oracle = Oracle(broker_url)
    app = sc.App(url=broker_url, grace_period=GRACE)
    runs: list[tuple[str | None, bool]] = []
    second = anyio.Event()

    @app.consumer(queue, queue_type="quorum", consumer_timeout=1.0, timeout=10.0)
    async def handle(msg: sc.Message) -> None:
        runs.append((msg.message_id, msg.redelivered))
        if msg.message_id == "slow" and len(runs) == 1:
            await anyio.sleep(2.5)
        if msg.message_id == "after":
            second.set()

    caplog.set_level(logging.INFO, logger="strictconsume")
    async with app.running():
        await oracle.publish(queue, b"{}", message_id="slow")

        async def timed_out() -> bool:
            return app.metrics.consumer_timeouts[queue] == 1

        async def subscribed_again() -> bool:
            return len(events(caplog, "subscribed")) == 2 and app.ready

        async def settled() -> bool:
            idle = not any(app.metrics.inflight().values())
            return idle and await oracle.message_count(queue) == 0

        await wait_until(timed_out, what="the consumer timeout")
        await wait_until(subscribed_again, what="subscribed again")
        await oracle.publish(queue, b"{}", message_id="after")
        with anyio.fail_after(DEADLINE):
            await second.wait()
        await wait_until(settled, what="the queue empty, no handler running")

    assert app.metrics.consumer_timeouts[queue] == 1
    [record] = events(caplog, "consumer_timeout")
    assert (record.queue, record.message_id) == (queue, "slow")  # type: ignore[attr-defined]
    assert "cancelled the consumer" in record.getMessage()
    assert not [
        r for r in caplog.records if "channel" in r.getMessage() and "406" in r.getMessage()
    ]
    # the slow message ran once, or once more after the broker took it back
    assert runs[0] == ("slow", False)
    assert runs[-1][0] == "after"
    assert app.outcomes[queue, "ack"] == len(runs)
    assert await Oracle(broker_url).consumer_count(queue) == 0


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_per_consumer_timeout_is_accepted_by_every_version(
    broker_url: str,
    broker_version: tuple[int, int, int],
    queues: list[str],
    queue_type: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``consumer_timeout=`` never makes a consume fail: 4.3 refuses x-consumer-timeout
    on a classic queue, so it is not sent there (4.3 takes no classic delivery back);
    3.10 does not know it, and a warning says so. A handler held longer than a
    classic consumer's timeout on 4.3 is acked as usual."""
    queue = new_queue(queues)
    app = sc.App(url=broker_url, grace_period=GRACE)
    done = anyio.Event()

    @app.consumer(queue, queue_type=queue_type, consumer_timeout=1.0, timeout=10.0)  # type: ignore[arg-type]
    async def handle(msg: sc.Message) -> None:
        if not consumer_timeout_enforced(broker_version, queue_type):
            await anyio.sleep(2.0)
        done.set()

    caplog.set_level(logging.INFO, logger="strictconsume")
    async with app.running():
        await Oracle(broker_url).publish(queue, b"{}", message_id="m")
        with anyio.fail_after(DEADLINE):
            await done.wait()

        async def acked() -> bool:
            return app.outcomes[queue, "ack"] == 1

        await wait_until(acked, what="the ack")
    assert app.metrics.consumer_timeouts[queue] == 0
    assert await Oracle(broker_url).message_count(queue) == 0
    unhonoured = [
        r.getMessage()
        for r in caplog.records
        if "does not honour a per-consumer consumer_timeout" in r.getMessage()
    ]
    assert bool(unhonoured) == (
        broker_version[:2] < (3, 12) and consumer_timeout_enforced(broker_version, queue_type)
    )


async def test_transient_queues_work_and_are_warned_about_where_deprecated(
    broker_url: str,
    broker_version: tuple[int, int, int],
    queues: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = new_queue(queues)
    app = sc.App(url=broker_url, grace_period=GRACE)
    done = anyio.Event()

    @app.consumer(queue, durable=False, timeout=10.0)
    async def handle(msg: sc.Message) -> None:
        done.set()

    async with app.running():
        await Oracle(broker_url).publish(queue, b"{}")
        with anyio.fail_after(DEADLINE):
            await done.wait()
    warned = [r for r in caplog.records if "durable=False" in r.getMessage()]
    assert bool(warned) == transient_queues_deprecated(broker_version)


@pytest.mark.slow
async def test_a_broker_that_refuses_transient_queues_is_a_startup_error(
    broker_version: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4.3 broker configured with ``deprecated_features.permit.transient_nonexcl_queues
    = false`` closes the connection (541) at the declaration of a durable=False queue:
    a one-line start-up error that says what to do, not a reconnect loop."""
    if external_broker_url() is not None:
        pytest.skip("starts a private node; the broker comes from STRICTCONSUME_URL")
    if not transient_queues_deprecated(broker_version):
        pytest.skip(f"RabbitMQ {broker_version} has no such setting")
    monkeypatch.setenv(
        "STRICTCONSUME_BROKER_CONF", "deprecated_features.permit.transient_nonexcl_queues = false"
    )
    node = Node(f"tnx{uuid.uuid4().hex[:8]}", free_node_port())
    dev_broker(*node.args, "start")
    try:
        app = sc.App(url=node.url, grace_period=GRACE)

        @app.consumer("transient-q", durable=False, timeout=10.0)
        async def handle(msg: sc.Message) -> None:
            raise AssertionError("never delivered")

        with anyio.fail_after(DEADLINE), pytest.raises(sc.StartupError) as info:
            async with app.running():
                pytest.fail("started with a refused transient queue")
        text = str(info.value)
        assert "541" in text
        assert "transient_nonexcl_queues" in text
        assert "declare the queue durable" in text
        assert app.reconnects == 0
    finally:
        dev_broker(*node.args, "purge", check=False)
