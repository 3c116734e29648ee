"""The dispatcher and the supervisor against the scripted fake broker.

A :class:`Supervisor` runs with a ``connect`` that opens an in-memory pair for each
connection attempt (or fails it) and runs the next broker script of the test's plan.
Scripts assert the exact frames the framework sends: which acks (tag, multiple) while
which handlers still run, the retry publish and its confirm before the ack, and, on
trio's autojump clock, the virtual time of every reconnect attempt.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import attrs
import pytest
import trio.testing
from pamqp import commands, header

from strictconsume import (
    ConsumerSpec,
    Message,
    Reject,
    Requeue,
    Retry,
    RetryLater,
    StartupError,
)
from strictconsume._backoff import DEFAULT_BACKOFF
from strictconsume._dispatch import ACK_DELAY, Shutdown, ack_batch
from strictconsume._outcome import OutcomeKind
from strictconsume._publisher import PublishChannelSlot
from strictconsume._retry import dead_letter_queue_name, retry_queue_name
from strictconsume._supervisor import Supervisor
from strictconsume._topology import dead_letter_arguments, queue_arguments, retry_arguments
from strictconsume.amqp import (
    Connection,
    ConnectionClosed,
    ConnectionLost,
    ConnectionParameters,
    connect_stream,
)

from ..amqp.fake_broker import ClientClosed, FakeBroker, pair

if TYPE_CHECKING:
    from strictconsume._consumer import Handler

pytestmark = pytest.mark.anyio

PASSWORD = "pw-Dsp-4471-never-shown"
PARAMS = ConnectionParameters(host="rabbit", username="alice", password=PASSWORD, vhost="shop")
URL = "amqp://alice:***@rabbit:5672/shop"
#: The channels the framework opens on the consumers' connection, in order:
#: declarations (closed again), then one per consumer from 1 on.
FIRST_CONSUMER_CHANNEL = 1
#: The publishing connection (the next connection attempt, opened when something
#: first publishes) has the channel of the framework's copies, then the user's.
PUBLISH_CHANNEL = 1
USER_PUBLISH_CHANNEL = 2

Script = Callable[[FakeBroker], Awaitable[None]]


def autojump() -> pytest.MarkDecorator:
    """Run on trio only, with a MockClock that jumps whenever every task is blocked."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-autojump")]
    )


class ZeroRandom(random.Random):
    """Every backoff delay is 0 s (full jitter drawing 0)."""

    def random(self) -> float:
        return 0.0


@attrs.define
class Connector:
    """The Supervisor's ``connect``: each call takes the next step of ``plan``: an
    exception to fail the attempt with, or a broker script to serve the connection."""

    tg: anyio.abc.TaskGroup
    plan: list[Script | BaseException]
    calls: list[tuple[float, str]] = attrs.Factory(list)
    brokers: list[FakeBroker] = attrs.Factory(list)

    @contextlib.asynccontextmanager
    async def __call__(self, params: ConnectionParameters) -> AsyncIterator[Connection]:
        self.calls.append((anyio.current_time(), params.host))
        assert self.plan, "more connection attempts than the test planned"
        step = self.plan.pop(0)
        if isinstance(step, BaseException):
            raise step
        client, broker = pair()
        self.brokers.append(broker)

        async def script() -> None:
            await step(broker)

        self.tg.start_soon(broker.serve, script)
        async with connect_stream(client, params) as conn:
            yield conn


@attrs.define
class Recorder:
    outcomes: list[tuple[str, OutcomeKind]] = attrs.Factory(list)

    def __call__(self, queue: str, kind: OutcomeKind, duration: float) -> None:
        self.outcomes.append((queue, kind))


#: BaseExceptions handlers raised (SystemExit...), which stop the App; none expected here.
fatal_errors: list[BaseException] = []


def make_supervisor(
    connector: Connector,
    specs: Sequence[ConsumerSpec],
    *,
    parameters: Sequence[ConnectionParameters] = (PARAMS,),
    prefetch: int = 5,
    shutdown: Shutdown | None = None,
    rng: random.Random | None = None,
    recorder: Recorder | None = None,
    **options: Any,
) -> Supervisor:
    return Supervisor(
        specs,
        parameters,
        prefetch=prefetch,
        shutdown=shutdown if shutdown is not None else Shutdown(),
        publishing=PublishChannelSlot(),
        on_outcome=recorder if recorder is not None else Recorder(),
        on_fatal=fatal_errors.append,
        random=rng if rng is not None else ZeroRandom(),
        connect=connector,
        **options,
    )


# -- the broker's side of a session ----------------------------------------------------------


def declarations(spec: ConsumerSpec) -> list[tuple[str, dict[str, Any]]]:
    """The queue.declare frames (name, arguments) a consumer's topology takes, in order."""
    queue = spec.queue
    names: list[tuple[str, dict[str, Any]]] = [
        (dead_letter_queue_name(queue), dict(dead_letter_arguments(spec) or {}))
    ]
    for delay in sorted(set(spec.retry.delays)):
        names.append((retry_queue_name(queue, delay), dict(retry_arguments(spec, delay))))
    names.append((queue, dict(queue_arguments(spec))))
    return names


async def serve_startup(
    broker: FakeBroker, specs: Sequence[ConsumerSpec], *, prefetch: int = 5
) -> list[str]:
    """Handshake, declarations, the publishing channel and every consumer's
    subscription, asserting each frame; returns the consumer tags."""
    await broker.handshake()
    await broker.open_channel(1)
    for spec in specs:
        for name, arguments in declarations(spec):
            declare = await broker.expect(commands.Queue.Declare, 1)
            assert (declare.queue, declare.arguments, declare.durable) == (name, arguments, True)
            await broker.send(1, commands.Queue.DeclareOk(name, 0, 0))
    await broker.close_channel(1)
    # The consumers subscribe at once, each on its channel: their frames interleave.
    by_queue = {spec.queue: spec for spec in specs}
    qos: dict[int, int] = {}
    tags: dict[str, str] = {}
    channels: set[int] = set()
    while len(tags) < len(specs):
        got = await broker.receive_frame()
        channel, frame = got.channel, got.frame
        if isinstance(frame, commands.Channel.Open):
            assert channel not in channels
            channels.add(channel)
            await broker.send(channel, commands.Channel.OpenOk())
        elif isinstance(frame, commands.Basic.Qos):
            qos[channel] = frame.prefetch_count
            await broker.send(channel, commands.Basic.QosOk())
        else:
            assert isinstance(frame, commands.Basic.Consume), f"unexpected {frame!r}"
            spec = by_queue[frame.queue]
            assert qos[channel] == (spec.prefetch or prefetch)
            assert frame.no_ack is False
            tags[spec.queue] = frame.consumer_tag or ""
            await broker.send(channel, commands.Basic.ConsumeOk(frame.consumer_tag))
    assert channels == set(range(FIRST_CONSUMER_CHANNEL, FIRST_CONSUMER_CHANNEL + len(specs)))
    return [tags[spec.queue] for spec in specs]


async def serve_publishing_startup(broker: FakeBroker) -> None:
    """Handshake and the two confirmed channels of the publishing connection."""
    await broker.handshake()
    for channel in (PUBLISH_CHANNEL, USER_PUBLISH_CHANNEL):
        await broker.open_channel(channel)
        await broker.expect(commands.Confirm.Select, channel)
        await broker.send(channel, commands.Confirm.SelectOk())


def assert_publishing_shutdown(seen: list[tuple[int, str]]) -> None:
    """Both publishing channels closed (in either order), then the connection."""
    *channels, last = seen
    assert sorted(channels) == [
        (PUBLISH_CHANNEL, "Channel.Close"),
        (USER_PUBLISH_CHANNEL, "Channel.Close"),
    ]
    assert last == (0, "Connection.Close")


async def serve_until_closed(broker: FakeBroker) -> list[tuple[int, str]]:
    """Answer cancels and closes until the client closes the socket; returns the
    (channel, method name) of every frame it sent meanwhile."""
    seen: list[tuple[int, str]] = []
    while True:
        try:
            received = await broker.receive_frame()
        except ClientClosed:
            return seen
        frame = received.frame
        seen.append((received.channel, getattr(frame, "name", type(frame).__name__)))
        if isinstance(frame, commands.Basic.Cancel):
            await broker.send(received.channel, commands.Basic.CancelOk(frame.consumer_tag))
        elif isinstance(frame, commands.Channel.Close):
            await broker.send(received.channel, commands.Channel.CloseOk())
        elif isinstance(frame, commands.Connection.Close):
            await broker.send(0, commands.Connection.CloseOk())


CLEAN_SHUTDOWN = [
    (FIRST_CONSUMER_CHANNEL, "Basic.Cancel"),
    (FIRST_CONSUMER_CHANNEL, "Channel.Close"),
    (0, "Connection.Close"),
]


def acks_of(frames: Sequence[object]) -> list[tuple[int, bool]]:
    acks = []
    for frame in frames:
        assert isinstance(frame, commands.Basic.Ack), f"expected an ack, got {frame!r}"
        acks.append((frame.delivery_tag, frame.multiple))
    return acks


def content_header(broker: FakeBroker) -> header.ContentHeader:
    """The content header of the last publish the broker received."""
    for received in reversed(broker.received):
        if isinstance(received.frame, header.ContentHeader):
            return received.frame
    raise AssertionError("no publish received")


class Gates:
    """One event per delivery tag: a handler waits on its tag's gate."""

    def __init__(self, tags: Sequence[int]) -> None:
        self.open = {tag: anyio.Event() for tag in tags}
        self.running: set[int] = set()
        self.done: set[int] = set()
        self.all_running = anyio.Event()
        self.expected = len(tags)

    async def handler(self, msg: Message) -> None:
        self.running.add(msg.delivery_tag)
        if len(self.running) == self.expected:
            self.all_running.set()
        await self.open[msg.delivery_tag].wait()
        self.running.discard(msg.delivery_tag)
        self.done.add(msg.delivery_tag)


def spec_for(handler: Handler, queue: str = "orders", **options: Any) -> ConsumerSpec:
    return ConsumerSpec(queue, handler, **options)


# -- 1. exact ack frames -----------------------------------------------------------------------

Step = tuple[set[int], list[tuple[int, bool]]]

ACK_SCENARIOS = [
    pytest.param(
        [({2, 3}, [(2, False), (3, False)]), ({1}, [(1, False)]), ({4, 5}, [(5, True)])],
        id="gap-then-head-then-prefix",
    ),
    pytest.param([({1, 2, 3, 4, 5}, [(5, True)])], id="all-at-once"),
    pytest.param(
        [({1, 2, 3}, [(3, True)]), ({5}, [(5, False)]), ({4}, [(4, False)])],
        id="prefix-then-above-a-gap",
    ),
    pytest.param(
        [({3}, [(3, False)]), ({1}, [(1, False)]), ({2, 4}, [(4, True)]), ({5}, [(5, False)])],
        id="prefix-over-a-single-ack",
    ),
]


@pytest.mark.parametrize("steps", ACK_SCENARIOS)
async def test_acks_are_coalesced_exactly(anyio_backend: Any, steps: list[Step]) -> None:
    gates = Gates(range(1, 6))
    shutdown = Shutdown()
    seen: list[list[tuple[int, bool]]] = []

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        for delivery_tag in range(1, 6):
            await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, delivery_tag, b"m")
        await gates.all_running.wait()
        for release, expected in steps:
            for delivery_tag in release:
                gates.open[delivery_tag].set()
            frames = [
                await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL) for _ in expected
            ]
            seen.append(acks_of(frames))
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    spec = spec_for(gates.handler)
    recorder = Recorder()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            connector = Connector(tg, [script])
            supervisor = make_supervisor(connector, [spec], shutdown=shutdown, recorder=recorder)
            await supervisor.run()
    assert seen == [expected for _, expected in steps]
    assert gates.done == {1, 2, 3, 4, 5}
    assert recorder.outcomes == [("orders", OutcomeKind.ACK)] * 5


async def test_slow_head_does_not_hold_back_the_others(anyio_backend: Any) -> None:
    gates = Gates(range(1, 6))
    shutdown = Shutdown()
    running_when_acked: list[set[int]] = []

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        for delivery_tag in range(1, 6):
            await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, delivery_tag, b"m")
        await gates.all_running.wait()
        for delivery_tag in (2, 3, 4, 5):
            gates.open[delivery_tag].set()
            ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
            assert (ack.delivery_tag, ack.multiple) == (delivery_tag, False)
            running_when_acked.append(set(gates.running))
        # Nothing more is sent while tag 1 runs (a heartbeat-free connection is silent).
        with anyio.move_on_after(0.05):
            unexpected = await broker.receive_frame()
            pytest.fail(f"the client sent {unexpected!r} while tag 1 still ran")
        gates.open[1].set()
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        assert (ack.delivery_tag, ack.multiple) == (1, False)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    spec = spec_for(gates.handler)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await make_supervisor(Connector(tg, [script]), [spec], shutdown=shutdown).run()
    assert running_when_acked == [{1, 3, 4, 5}, {1, 4, 5}, {1, 5}, {1}]


@autojump()
async def test_at_prefetch_100_acks_go_out_per_batch_of_an_eighth_or_after_the_delay(
    anyio_backend: Any,
) -> None:
    """Prefetch 100 acks in batches of 12 (an eighth). 20 handlers that finish in one
    scheduler round (in the shuffled order trio runs them) are acked by one
    multiple-ack at once, without waiting for the delay; a lone message is acked
    ACK_DELAY after it finished, not sooner."""
    assert ack_batch(100) == 12
    gates = Gates(range(1, 22))
    gates.expected = 20
    shutdown = Shutdown()
    seen: list[tuple[float, list[tuple[int, bool]]]] = []

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec], prefetch=100)
        for delivery_tag in range(1, 21):
            await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, delivery_tag, b"m")
        await gates.all_running.wait()
        released = anyio.current_time()
        for delivery_tag in range(1, 21):
            gates.open[delivery_tag].set()
        frame = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        seen.append((anyio.current_time() - released, acks_of([frame])))
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 21, b"m")
        await lone_running.wait()
        released = anyio.current_time()
        gates.open[21].set()
        frame = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        seen.append((anyio.current_time() - released, acks_of([frame])))
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    lone_running = anyio.Event()

    async def handler(msg: Message) -> None:
        if msg.delivery_tag == 21:
            lone_running.set()
        await gates.handler(msg)

    spec = spec_for(handler)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            connector = Connector(tg, [script])
            await make_supervisor(connector, [spec], prefetch=100, shutdown=shutdown).run()
    *batch, lone = seen
    assert batch == [(0.0, [(20, True)])]
    assert lone[0] == pytest.approx(ACK_DELAY)
    assert lone[1] == [(21, False)]


# -- 2. failures: timeout, reject, requeue -----------------------------------------------------


@autojump()
async def test_handler_timeout_retries_through_the_retry_queue_then_acks(
    anyio_backend: Any,
) -> None:
    shutdown = Shutdown()
    times: dict[str, float] = {}

    async def handler(msg: Message) -> None:
        await anyio.sleep_forever()

    copied = anyio.Event()
    t0 = 0.0

    async def script(broker: FakeBroker) -> None:
        nonlocal t0
        [tag] = await serve_startup(broker, [spec])
        t0 = anyio.current_time()
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b'{"order": 1}')
        await copied.wait()
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        times["ack"] = broker.received[-1].time - t0
        assert (ack.delivery_tag, ack.multiple) == (1, False)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    async def publishing(broker: FakeBroker) -> None:
        await serve_publishing_startup(broker)
        method, data = await broker.expect_publish(PUBLISH_CHANNEL)
        times["publish"] = broker.received[-1].time - t0
        assert (method.exchange, method.routing_key, method.mandatory) == (
            "",
            "orders.retry.1000",
            True,
        )
        assert data == b'{"order": 1}'
        properties = content_header(broker).properties
        assert properties.headers == {
            "x-attempt": 2,
            "x-original-exchange": "",
            "x-original-routing-key": "q",
        }
        assert properties.delivery_mode == 2
        # The original is acked only once the broker confirmed the copy.
        await anyio.sleep(0.5)
        await broker.send(PUBLISH_CHANNEL, commands.Basic.Ack(1))
        copied.set()
        assert_publishing_shutdown(await serve_until_closed(broker))

    spec = spec_for(handler, timeout=2.0, retry=Retry(delays=(1.0, 10.0)))
    recorder = Recorder()
    async with anyio.create_task_group() as tg:
        await make_supervisor(
            Connector(tg, [script, publishing]), [spec], shutdown=shutdown, recorder=recorder
        ).run()
    assert times == {"publish": 2.0, "ack": 2.5}
    assert recorder.outcomes == [("orders", OutcomeKind.RETRY)]


async def test_reject_dead_letters_with_the_reason_then_acks(anyio_backend: Any) -> None:
    shutdown = Shutdown()

    async def handler(msg: Message) -> None:
        raise Reject(f"unknown customer in {msg.json()['order']}")

    copied = anyio.Event()

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b'{"order": 7}')
        await copied.wait()
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        assert (ack.delivery_tag, ack.multiple) == (1, False)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    async def publishing(broker: FakeBroker) -> None:
        await serve_publishing_startup(broker)
        method, data = await broker.expect_publish(PUBLISH_CHANNEL)
        assert (method.exchange, method.routing_key, method.mandatory) == ("", "orders.dlq", True)
        assert data == b'{"order": 7}'
        headers = dict(content_header(broker).properties.headers or {})
        failed_at = headers.pop("x-failed-at")
        assert headers == {
            "x-error-type": "strictconsume.Reject",
            "x-error-message": "unknown customer in 7",
            "x-failed-queue": "orders",
            "x-attempt": 1,
            "x-original-exchange": "",
            "x-original-routing-key": "q",
        }
        assert isinstance(failed_at, str)
        assert failed_at.endswith("Z")
        assert len(failed_at) == len("2024-01-01T00:00:00.000Z")
        await broker.send(PUBLISH_CHANNEL, commands.Basic.Ack(1))
        copied.set()
        assert_publishing_shutdown(await serve_until_closed(broker))

    spec = spec_for(handler)
    recorder = Recorder()
    async with anyio.create_task_group() as tg:
        await make_supervisor(
            Connector(tg, [script, publishing]), [spec], shutdown=shutdown, recorder=recorder
        ).run()
    assert recorder.outcomes == [("orders", OutcomeKind.DEAD_LETTER)]


async def test_requeue_is_a_single_nack_with_requeue(anyio_backend: Any) -> None:
    shutdown = Shutdown()
    gates = Gates([1, 2, 3])

    async def handler(msg: Message) -> None:
        await gates.handler(msg)
        if msg.delivery_tag == 2:
            raise Requeue

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        for delivery_tag in (1, 2, 3):
            await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, delivery_tag, b"m")
        await gates.all_running.wait()
        gates.open[2].set()
        nack = await broker.expect(commands.Basic.Nack, FIRST_CONSUMER_CHANNEL)
        assert (nack.delivery_tag, nack.multiple, nack.requeue) == (2, False, True)
        gates.open[1].set()
        gates.open[3].set()
        # 1 and 3 finished, 2 was nacked: one multiple-ack settles both.
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        assert (ack.delivery_tag, ack.multiple) == (3, True)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    spec = spec_for(handler)
    recorder = Recorder()
    async with anyio.create_task_group() as tg:
        await make_supervisor(
            Connector(tg, [script]), [spec], shutdown=shutdown, recorder=recorder
        ).run()
    assert sorted(kind.value for _, kind in recorder.outcomes) == ["ack", "ack", "requeue"]


@autojump()
async def test_shutdown_grace_then_nack_with_requeue(anyio_backend: Any) -> None:
    shutdown = Shutdown()
    gates = Gates([1, 2])
    times: dict[str, float] = {}

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        for delivery_tag in (1, 2):
            await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, delivery_tag, b"m")
        await gates.all_running.wait()
        t0 = anyio.current_time()
        shutdown.request(5.0)
        cancel = await broker.expect(commands.Basic.Cancel, FIRST_CONSUMER_CHANNEL)
        times["cancel"] = anyio.current_time() - t0
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.CancelOk(cancel.consumer_tag))
        await anyio.sleep(1.0)
        gates.open[2].set()  # finishes within the grace period: acked
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        assert (ack.delivery_tag, ack.multiple) == (2, False)
        nack = await broker.expect(commands.Basic.Nack, FIRST_CONSUMER_CHANNEL)
        times["nack"] = anyio.current_time() - t0
        assert (nack.delivery_tag, nack.multiple, nack.requeue) == (1, False, True)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN[1:]

    spec = spec_for(gates.handler, timeout=60.0)
    recorder = Recorder()
    async with anyio.create_task_group() as tg:
        await make_supervisor(
            Connector(tg, [script]), [spec], shutdown=shutdown, recorder=recorder
        ).run()
    assert times == {"cancel": 0.0, "nack": 5.0}
    assert sorted(kind.value for _, kind in recorder.outcomes) == ["ack", "cancelled"]


async def test_retry_delay_outside_the_policy_declares_its_retry_queue(
    anyio_backend: Any,
) -> None:
    """``RetryLater(delay=2.5)`` (2.5 s is an ad-hoc step) with no ``.retry.2500``
    queue in the policy: the queue is declared on the copies' channel, with
    ``x-expires`` (its TTL plus two hours), the copy published, and only then is the
    original acked."""
    shutdown = Shutdown()

    async def handler(msg: Message) -> None:
        raise RetryLater(delay=2.5)

    copied = anyio.Event()

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b"later")
        await copied.wait()
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        assert (ack.delivery_tag, ack.multiple) == (1, False)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    async def publishing(broker: FakeBroker) -> None:
        await serve_publishing_startup(broker)
        declare = await broker.expect(commands.Queue.Declare, PUBLISH_CHANNEL)
        assert (declare.queue, declare.durable, declare.arguments) == (
            "orders.retry.2500",
            True,
            {
                "x-message-ttl": 2500,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "orders",
                "x-expires": 2500 + 7_200_000,
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        await broker.send(PUBLISH_CHANNEL, commands.Queue.DeclareOk("orders.retry.2500", 0, 0))
        method, data = await broker.expect_publish(PUBLISH_CHANNEL)
        assert (method.routing_key, method.mandatory, data) == ("orders.retry.2500", True, b"later")
        assert (content_header(broker).properties.headers or {})["x-attempt"] == 2
        await broker.send(PUBLISH_CHANNEL, commands.Basic.Ack(1))
        copied.set()
        assert_publishing_shutdown(await serve_until_closed(broker))

    spec = spec_for(handler, retry=Retry(delays=(1.0,)))
    recorder = Recorder()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await make_supervisor(
                Connector(tg, [script, publishing]), [spec], shutdown=shutdown, recorder=recorder
            ).run()
    assert recorder.outcomes == [("orders", OutcomeKind.RETRY)]


async def test_a_nacked_retry_copy_requeues_the_original_instead_of_acking(
    anyio_backend: Any,
) -> None:
    shutdown = Shutdown()

    async def handler(msg: Message) -> None:
        raise ValueError("flaky")

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b"m")
        nack = await broker.expect(commands.Basic.Nack, FIRST_CONSUMER_CHANNEL)
        assert (nack.delivery_tag, nack.multiple, nack.requeue) == (1, False, True)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN  # and no ack

    async def publishing(broker: FakeBroker) -> None:
        await serve_publishing_startup(broker)
        method, _ = await broker.expect_publish(PUBLISH_CHANNEL)
        assert method.routing_key == "orders.retry.1000"
        await broker.send(PUBLISH_CHANNEL, commands.Basic.Nack(1))
        assert_publishing_shutdown(await serve_until_closed(broker))

    spec = spec_for(handler, retry=Retry(delays=(1.0,)))
    recorder = Recorder()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await make_supervisor(
                Connector(tg, [script, publishing]), [spec], shutdown=shutdown, recorder=recorder
            ).run()
    assert recorder.outcomes == [("orders", OutcomeKind.REQUEUE)]


async def test_a_copy_over_the_brokers_size_limit_rejects_the_original(
    anyio_backend: Any,
) -> None:
    """RabbitMQ 4.0 refuses a publish over its max_message_size (16 MiB by default)
    by closing the channel with 406. Publishing the same copy again can never work:
    the original is rejected (the broker dead-letters it as it is), not requeued into
    a loop."""
    shutdown = Shutdown()

    async def handler(msg: Message) -> None:
        raise Reject("not wanted")

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b"large")
        nack = await broker.expect(commands.Basic.Nack, FIRST_CONSUMER_CHANNEL)
        assert (nack.delivery_tag, nack.multiple, nack.requeue) == (1, False, False)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN  # and no ack

    async def publishing(broker: FakeBroker) -> None:
        await serve_publishing_startup(broker)
        method, _ = await broker.expect_publish(PUBLISH_CHANNEL)
        assert method.routing_key == "orders.dlq"
        await broker.send(
            PUBLISH_CHANNEL,
            commands.Channel.Close(
                406,
                "PRECONDITION_FAILED - message size 16777217 is larger than configured "
                "max size 16777216",
                60,
                40,
            ),
        )
        await broker.expect(commands.Channel.CloseOk, PUBLISH_CHANNEL)
        # the publisher may open its channel again; nothing more is published
        while True:
            try:
                received = await broker.receive_frame()
            except ClientClosed:
                return
            frame = received.frame
            assert not isinstance(frame, commands.Basic.Publish), "the copy was sent again"
            if isinstance(frame, commands.Channel.Open):
                await broker.send(received.channel, commands.Channel.OpenOk())
            elif isinstance(frame, commands.Confirm.Select):
                await broker.send(received.channel, commands.Confirm.SelectOk())
            elif isinstance(frame, commands.Channel.Close):
                await broker.send(received.channel, commands.Channel.CloseOk())
            elif isinstance(frame, commands.Connection.Close):
                await broker.send(0, commands.Connection.CloseOk())

    spec = spec_for(handler)
    recorder = Recorder()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await make_supervisor(
                Connector(tg, [script, publishing]), [spec], shutdown=shutdown, recorder=recorder
            ).run()
    assert recorder.outcomes == [("orders", OutcomeKind.DEAD_LETTER)]


@autojump()
async def test_broker_cancel_resubscribes_after_backoff_and_redeclares(
    anyio_backend: Any,
) -> None:
    """A server-sent basic.cancel (the queue was deleted): the consumer's channel is
    replaced after a backoff delay, the topology declared again, the consumer
    subscribed again; readiness is false in between."""
    shutdown = Shutdown()
    handled = Handled()
    seed = 11
    times: dict[str, float] = {}
    ready_during_backoff: list[bool] = []

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        t0 = anyio.current_time()
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.Cancel(tag, nowait=True))
        await broker.close_channel(FIRST_CONSUMER_CHANNEL)
        await broker.open_channel(FIRST_CONSUMER_CHANNEL)
        times["reopened"] = anyio.current_time() - t0
        ready_during_backoff.append(supervisor.ready)
        qos = await broker.expect(commands.Basic.Qos, FIRST_CONSUMER_CHANNEL)
        assert qos.prefetch_count == 5
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.QosOk())
        for name, arguments in declarations(spec):
            declare = await broker.expect(commands.Queue.Declare, FIRST_CONSUMER_CHANNEL)
            assert (declare.queue, declare.arguments) == (name, arguments)
            await broker.send(FIRST_CONSUMER_CHANNEL, commands.Queue.DeclareOk(name, 0, 0))
        consume = await broker.expect(commands.Basic.Consume, FIRST_CONSUMER_CHANNEL)
        assert consume.queue == "orders"
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.ConsumeOk(consume.consumer_tag))
        await broker.deliver(FIRST_CONSUMER_CHANNEL, consume.consumer_tag or "", 1, b"again")
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        assert (ack.delivery_tag, ack.multiple) == (1, False)
        assert supervisor.ready
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    spec = spec_for(handled.handler)
    async with anyio.create_task_group() as tg:
        supervisor = make_supervisor(
            Connector(tg, [script]), [spec], shutdown=shutdown, rng=random.Random(seed)
        )
        await supervisor.run()
    expected_delay = DEFAULT_BACKOFF.delay(0, random.Random(seed).random())
    assert times["reopened"] == pytest.approx(expected_delay, rel=0, abs=1e-9)
    assert ready_during_backoff == [False]
    assert handled.bodies == [b"again"]
    assert supervisor.reconnects == 0


async def serve_resubscription(broker: FakeBroker, spec: ConsumerSpec) -> str:
    """After the consumer's channel closed: its new channel, qos, the topology
    declared again and the consume; returns the new consumer tag."""
    await broker.open_channel(FIRST_CONSUMER_CHANNEL)
    await broker.expect(commands.Basic.Qos, FIRST_CONSUMER_CHANNEL)
    await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.QosOk())
    for name, _ in declarations(spec):
        await broker.expect(commands.Queue.Declare, FIRST_CONSUMER_CHANNEL)
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Queue.DeclareOk(name, 0, 0))
    consume = await broker.expect(commands.Basic.Consume, FIRST_CONSUMER_CHANNEL)
    await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.ConsumeOk(consume.consumer_tag))
    return consume.consumer_tag or ""


def consume_arguments(broker: FakeBroker) -> list[object]:
    """The arguments of every basic.consume the broker received."""
    return [
        dict(r.frame.arguments or {})
        for r in broker.received
        if isinstance(r.frame, commands.Basic.Consume)
    ]


@autojump()
async def test_a_consumer_timeout_on_rabbitmq_4_3_is_counted_logged_and_subscribed_again(
    anyio_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ 4.3 cancels a quorum consumer whose delivery stays unacked past its
    x-consumer-timeout and keeps the channel open: the App counts it once, logs the
    message it was holding, lets the handler finish (its ack still goes out), and
    subscribes again. A later cancel with no delivery held that long (a deleted
    queue) is not a consumer timeout."""
    shutdown = Shutdown()
    timeouts: list[str] = []

    async def handler(msg: Message) -> None:
        if msg.body == b"slow":
            await anyio.sleep(6)

    async def script(broker: FakeBroker) -> None:
        broker.server_properties = {**broker.server_properties, "version": "4.3.6"}
        [tag] = await serve_startup(broker, [spec])
        assert consume_arguments(broker) == [{"x-consumer-timeout": 5000}]
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b"slow")
        await anyio.sleep(5)
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.Cancel(tag, nowait=True))
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        assert ack.delivery_tag == 1
        assert anyio.current_time() - t0 == pytest.approx(6)
        assert timeouts == ["orders"]
        await broker.close_channel(FIRST_CONSUMER_CHANNEL)
        tag = await serve_resubscription(broker, spec)
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.Cancel(tag, nowait=True))
        await broker.close_channel(FIRST_CONSUMER_CHANNEL)
        await serve_resubscription(broker, spec)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    spec = spec_for(handler, queue_type="quorum", consumer_timeout=5.0)
    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        await make_supervisor(
            Connector(tg, [script]),
            [spec],
            shutdown=shutdown,
            on_consumer_timeout=timeouts.append,
        ).run()
    assert timeouts == ["orders"]
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "consumer_timeout"]
    assert record.levelname == "WARNING"
    assert (record.queue, record.delivery_tag) == ("orders", 1)  # type: ignore[attr-defined]
    assert "delivery_tag 1), unacked for 5.0 s" in record.getMessage()
    assert "cancelled the consumer" in record.getMessage()


@autojump()
async def test_a_consumer_timeout_before_rabbitmq_4_3_closes_the_channel(
    anyio_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Up to 4.2 the broker closes the channel (406) on a consumer timeout: the
    handler loses its channel (the broker redelivers the message), the App counts and
    logs it, and subscribes again on a new channel. A classic consumer sends its
    x-consumer-timeout there too (4.3 would refuse it on a classic queue)."""
    shutdown = Shutdown()
    timeouts: list[str] = []
    cancelled = anyio.Event()

    async def handler(msg: Message) -> None:
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async def script(broker: FakeBroker) -> None:
        broker.server_properties = {**broker.server_properties, "version": "4.0.5"}
        [tag] = await serve_startup(broker, [spec])
        assert consume_arguments(broker) == [{"x-consumer-timeout": 2000}]
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b"stuck")
        await anyio.sleep(2)
        text = (
            "PRECONDITION_FAILED - delivery acknowledgement on channel 2 timed out. "
            "Timeout value used: 2000 ms. This timeout value can be configured, see "
            "consumers doc guide to learn more"
        )
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Channel.Close(406, text, 0, 0))
        await broker.expect(commands.Channel.CloseOk, FIRST_CONSUMER_CHANNEL)
        await cancelled.wait()
        await serve_resubscription(broker, spec)
        assert timeouts == ["orders"]
        shutdown.request(5.0)
        frames = await serve_until_closed(broker)
        assert not {"Basic.Ack", "Basic.Nack"} & {name for _, name in frames}

    spec = spec_for(handler, consumer_timeout=2.0)
    async with anyio.create_task_group() as tg:
        await make_supervisor(
            Connector(tg, [script]),
            [spec],
            shutdown=shutdown,
            on_consumer_timeout=timeouts.append,
        ).run()
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "consumer_timeout"]
    assert "closed the channel" in record.getMessage()
    assert record.delivery_tag == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("version", "queue_type", "sent"),
    [
        ("3.10.8", "quorum", False),  # before 3.12: not honoured, not sent
        ("3.12.0", "classic", True),
        ("4.0.5", "quorum", True),
        ("4.3.6", "quorum", True),
        ("4.3.6", "classic", False),  # 4.3 refuses it on a classic queue
    ],
)
async def test_the_consumer_timeout_argument_is_sent_where_the_broker_honours_it(
    anyio_backend: Any, version: str, queue_type: str, sent: bool
) -> None:
    shutdown = Shutdown()

    async def script(broker: FakeBroker) -> None:
        broker.server_properties = {**broker.server_properties, "version": version}
        await serve_startup(broker, [spec])
        expected = {"x-consumer-timeout": 90000} if sent else {}
        assert consume_arguments(broker) == [expected]
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    spec = spec_for(_noop, queue_type=queue_type, consumer_timeout=90.0)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await make_supervisor(Connector(tg, [script]), [spec], shutdown=shutdown).run()


# -- 3. reconnecting ---------------------------------------------------------------------------


async def _noop(msg: Message) -> None:
    pass


class Handled:
    """A handler that records what it got, and an event set at the first message."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.event = anyio.Event()

    async def handler(self, msg: Message) -> None:
        self.bodies.append(msg.body)
        self.event.set()


async def serve_one_message(broker: FakeBroker, spec: ConsumerSpec) -> None:
    """A session that delivers one message, sees it acked, then serves the shutdown."""
    [tag] = await serve_startup(broker, [spec])
    await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b"after reconnect")
    ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
    assert (ack.delivery_tag, ack.multiple) == (1, False)
    assert await serve_until_closed(broker) == CLEAN_SHUTDOWN


def expected_attempt_times(t0: float, seed: int, attempts: Sequence[int]) -> list[float]:
    """When each connection attempt starts: ``attempts`` are the backoff attempt
    numbers of the sleeps between them, each drawing one number from a Random(seed)."""
    rng = random.Random(seed)
    times = [t0]
    for attempt in attempts:
        times.append(times[-1] + DEFAULT_BACKOFF.delay(attempt, rng.random()))
    return times


@autojump()
async def test_reconnect_backoff_is_full_jitter_on_the_virtual_clock(anyio_backend: Any) -> None:
    failures = 7
    shutdown = Shutdown()
    spec = spec_for(_noop, retry=Retry(delays=()))

    async def script(broker: FakeBroker) -> None:
        await serve_startup(broker, [spec])
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    async with anyio.create_task_group() as tg:
        plan: list[Script | BaseException] = [
            ConnectionLost(f"cannot reach rabbit (attempt {n})") for n in range(failures)
        ]
        connector = Connector(tg, [*plan, script])
        supervisor = make_supervisor(
            connector, [spec], shutdown=shutdown, rng=random.Random(20240501)
        )
        t0 = anyio.current_time()
        await tg.start(supervisor.run)
        assert supervisor.ready
        assert supervisor.reconnects == 0
        times = [t for t, _ in connector.calls]
        expected = expected_attempt_times(t0, 20240501, range(failures))
        assert times == pytest.approx(expected, rel=0, abs=1e-9)
        # The ceilings grow 0.5, 1, 2, 4, 8, 16, 30: the draws really are spread.
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0 <= gap <= DEFAULT_BACKOFF.ceiling(n) for n, gap in enumerate(gaps))
        assert len(set(gaps)) == failures
        shutdown.request(1.0)


@autojump()
@pytest.mark.parametrize(("lived", "attempt_after"), [(10.0, 3), (59.9, 3), (60.1, 0), (75.0, 0)])
async def test_backoff_resets_after_a_connection_lived_60_s(
    anyio_backend: Any, lived: float, attempt_after: int
) -> None:
    shutdown = Shutdown()
    handled = Handled()
    spec = spec_for(handled.handler, retry=Retry(delays=()))
    lost_at: list[float] = []

    async def short_lived(broker: FakeBroker) -> None:
        await serve_startup(broker, [spec])
        await anyio.sleep(lived)
        lost_at.append(anyio.current_time())
        await broker.send_eof()
        await broker.expect_eof()

    async def final(broker: FakeBroker) -> None:
        await serve_one_message(broker, spec)

    seed = 7
    async with anyio.create_task_group() as tg:
        lost = [ConnectionLost("refused") for _ in range(3)]
        connector = Connector(tg, [*lost, short_lived, *lost, final])
        supervisor = make_supervisor(connector, [spec], shutdown=shutdown, rng=random.Random(seed))
        t0 = anyio.current_time()
        await tg.start(supervisor.run)
        # Ready on the 4th attempt; subscribed again (a message arrives) on the 8th.
        await handled.event.wait()
        assert supervisor.ready
        assert len(connector.calls) == 8
        times = [t for t, _ in connector.calls]
        rng = random.Random(seed)
        draws = [rng.random() for _ in range(7)]
        expected = expected_attempt_times(t0, seed, [0, 1, 2])
        assert times[:4] == pytest.approx(expected, rel=0, abs=1e-9)
        assert lost_at[0] - times[3] == pytest.approx(lived, rel=0, abs=1e-9)
        # After the loss: attempt 3 (it lived too short) or 0 (reset), then counting on.
        after = [lost_at[0]]
        for n, draw in enumerate(draws[3:]):
            after.append(after[-1] + DEFAULT_BACKOFF.delay(attempt_after + n, draw))
        assert times[4:] == pytest.approx(after[1:], rel=0, abs=1e-9)
        assert supervisor.reconnects == 1
        shutdown.request(1.0)
    assert handled.bodies == [b"after reconnect"]


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (403, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"),
        (530, "NOT_ALLOWED - vhost shop not found"),
    ],
)
async def test_refused_login_before_the_first_ready_is_a_startup_error(
    anyio_backend: Any, code: int, text: str
) -> None:
    async def script(broker: FakeBroker) -> None:
        await broker.start()
        if code == 530:
            await broker.send(0, commands.Connection.Tune(2047, 131072, 0))
            await broker.expect(commands.Connection.TuneOk, 0)
            await broker.expect(commands.Connection.Open, 0)
        await broker.send(0, commands.Connection.Close(code, text, 0, 0))
        assert [type(f) for f in await broker.expect_eof()] == [commands.Connection.CloseOk]

    spec = spec_for(_noop)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            connector = Connector(tg, [script, script])
            supervisor = make_supervisor(connector, [spec])
            with pytest.raises(StartupError) as exc_info:
                await supervisor.run()
    error = exc_info.value
    assert URL in str(error)
    assert text in str(error)
    assert str(code) in str(error)
    assert "\n" not in str(error)
    assert isinstance(error.__cause__, ConnectionClosed)
    assert error.__cause__.reply_code == code
    assert PASSWORD not in str(error)
    assert len(connector.calls) == 1  # not retried
    assert not supervisor.connected


async def test_attempts_cycle_through_every_url_in_order(anyio_backend: Any) -> None:
    hosts = ("node-a", "node-b", "node-c")
    parameters = [attrs.evolve(PARAMS, host=host) for host in hosts]
    shutdown = Shutdown()
    handled = Handled()
    spec = spec_for(handled.handler, retry=Retry(delays=()))

    async def lost_after_ready(broker: FakeBroker) -> None:
        await serve_startup(broker, [spec])
        await broker.send_eof()
        await broker.expect_eof()

    async def final(broker: FakeBroker) -> None:
        await serve_one_message(broker, spec)

    forced = ConnectionClosed(320, "CONNECTION_FORCED - broker forced connection closure")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            plan: list[Script | BaseException] = [
                ConnectionLost("refused"),
                OSError(111, "Connection refused"),
                forced,  # not fatal, even before the first ready
                lost_after_ready,
                ConnectionLost("refused"),
                final,
            ]
            connector = Connector(tg, plan)
            supervisor = make_supervisor(
                connector, [spec], parameters=parameters, shutdown=shutdown
            )
            await tg.start(supervisor.run)
            await handled.event.wait()
            assert supervisor.ready
            shutdown.request(1.0)
    assert [host for _, host in connector.calls] == [
        "node-a",
        "node-b",
        "node-c",
        "node-a",
        "node-b",
        "node-c",
    ]
    assert supervisor.reconnects == 1
    assert not plan
    assert handled.bodies == [b"after reconnect"]


@autojump()
async def test_stop_during_the_startup_backoff_ends_the_loop_at_once(anyio_backend: Any) -> None:
    shutdown = Shutdown()
    spec = spec_for(_noop)
    stopped_at: list[float] = []
    rng = random.Random(3)
    first_sleep = DEFAULT_BACKOFF.delay(0, rng.random())
    second_sleep = DEFAULT_BACKOFF.delay(1, rng.random())
    assert second_sleep > 0.1  # so that the stop below comes during it
    async with anyio.create_task_group() as tg:
        connector = Connector(tg, [ConnectionLost("refused") for _ in range(3)])
        supervisor = make_supervisor(connector, [spec], shutdown=shutdown, rng=random.Random(3))

        async def stop_during_second_sleep() -> None:
            await anyio.sleep(first_sleep + 0.1)
            stopped_at.append(anyio.current_time())
            shutdown.request(1.0)

        tg.start_soon(stop_during_second_sleep)
        t0 = anyio.current_time()
        await tg.start(supervisor.run)  # signalled at the stop: nothing to wait for
        returned_at = anyio.current_time()
    times = [t for t, _ in connector.calls]
    assert times == pytest.approx(expected_attempt_times(t0, 3, [0]), rel=0, abs=1e-9)
    assert returned_at == stopped_at[0]
    assert not supervisor.ever_ready
    assert math.isfinite(shutdown.deadline)


@autojump()
async def test_an_app_without_consumers_keeps_its_connection(anyio_backend: Any) -> None:
    """With no consumer to run, the session must still hold the connection until the
    stop, not end at once and reconnect in a loop (the publishing connection of
    ``app.publisher()`` is opened only when something publishes)."""
    shutdown = Shutdown()
    after_ready: list[tuple[int, str]] = []

    async def script(broker: FakeBroker) -> None:
        await serve_startup(broker, [])
        after_ready.extend(await serve_until_closed(broker))

    async with anyio.create_task_group() as tg:
        connector = Connector(tg, [script])
        supervisor = make_supervisor(connector, [], shutdown=shutdown, rng=random.Random(5))
        await tg.start(supervisor.run)
        await anyio.sleep(100.0)
        calls, connected, reconnects = (
            len(connector.calls),
            supervisor.connected,
            supervisor.reconnects,
        )
        shutdown.request(1.0)
    assert (calls, connected, reconnects) == (1, True, 0)
    assert after_ready == [(0, "Connection.Close")]
