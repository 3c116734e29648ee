"""Regression tests for issue 14: the paths that must never lose or stall a message.

Each test fails on the code before its fix (named in the commit that adds it):

1. a flush whose socket stays backed up past ``SETTLE_TIMEOUT`` still sends every ack
   it took from the tracker (fake broker, autojump clock); retry copies go out on a
   publishing connection of their own, so a blocked one never holds up the acks
   (the 60 s memory alarm on the real broker is in ``tests/faults/test_alarm.py``);
2. after start-up, a queue that cannot be declared or consumed does not stop the other
   consumers: its own consumer retries with backoff;
3. a stop ends while the broker never answers basic.qos, and every synchronous call
   has a deadline;
6. an ad-hoc retry queue (which expires when unused) is declared again before a
   publish once its lease is old;
9. smaller ones: a lost connection during a backoff leaves no intake scope behind;
   ``app.run()`` inside ``app.running()`` raises and the block still stops; a
   publisher outside a running App tries every URL.
4. a publish issued while the publishing channel is reopened after a 404 gets the
   new channel instead of closing it;
8. a retried copy that a full classic queue refuses when its delay is over is kept
   until the queue has room (real broker, pika as the oracle).

Timing runs on trio's autojump clock and asserts virtual times; what the broker
does is pinned against the scripted fake broker of ``tests/amqp/fake_broker.py``.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import anyio
import anyio.to_thread
import pytest
import trio.testing
from pamqp import commands

import strictconsume as sc
from strictconsume import ConsumerSpec, Message, Retry, RetryLater
from strictconsume._backoff import DEFAULT_BACKOFF
from strictconsume._dispatch import SETTLE_FAILURE_PAUSE, SETTLE_TIMEOUT, Shutdown, _ChannelState
from strictconsume._publisher import PublishChannel
from strictconsume._retry import AD_HOC_LEASE_RENEWAL
from strictconsume.amqp import ChannelClosed, ConnectionParameters, connect_stream
from strictconsume.amqp._channel import CALL_TIMEOUT

from ..amqp.fake_broker import ClientClosed, FakeBroker, pair
from ..amqp.oracle import Oracle
from ..conftest import dev_broker
from .polling import wait_until
from .test_dispatch_fake import (
    CLEAN_SHUTDOWN,
    FIRST_CONSUMER_CHANNEL,
    PUBLISH_CHANNEL,
    Connector,
    Recorder,
    assert_publishing_shutdown,
    declarations,
    make_supervisor,
    serve_publishing_startup,
    serve_startup,
    serve_until_closed,
    spec_for,
)

pytestmark = pytest.mark.anyio

PARAMS = ConnectionParameters(host="rabbit", username="alice", password="pw-14", vhost="shop")


def autojump() -> pytest.MarkDecorator:
    """Run on trio only, with a MockClock that jumps whenever every task is blocked."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-autojump")]
    )


# -- 1. acks taken from the tracker are never dropped -----------------------------------------


@autojump()
async def test_acks_taken_while_the_socket_is_backed_up_are_all_sent(anyio_backend: Any) -> None:
    """The broker stops reading for 60 s (a blocked connection) while 10 MiB wait for
    the socket. A flush takes ack(1) and ack(3) (3 is above the gap at 2): both must
    reach the broker once it reads again, although the flush's bounded wait ended long
    before. The old flush queued ack(1), waited, gave up after SETTLE_TIMEOUT and
    forgot ack(3): the broker never got it."""
    client, broker = pair(client_buffer=0)  # the client's writes wait for the broker
    big = b"x" * (5 * 1024 * 1024)  # twice: more than WRITE_HIGH_WATER stays queued
    acks: list[tuple[int, bool]] = []
    flushed_after: list[float] = []
    all_read = anyio.Event()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await anyio.sleep(60)  # not reading: the client's socket is full
        for _ in range(2):
            await broker.expect_publish(1)
        while len(acks) < 2:
            ack = await broker.expect(commands.Basic.Ack, 1)
            acks.append((ack.delivery_tag, ack.multiple))
        all_read.set()
        await broker.close_channel(1)
        await broker.close_connection()

    with anyio.fail_after(300):
        async with anyio.create_task_group() as tg:
            tg.start_soon(broker.serve, script)
            async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
                await ch.publish(big, routing_key="a")
                await anyio.wait_all_tasks_blocked()  # the writer is stuck sending "a"
                await ch.publish(big, routing_key="b")  # queued in the client
                state = _ChannelState(ch, prefetch=8, concurrency=None)
                for tag in (1, 2, 3):
                    state.tracker.received(tag)
                state.tracker.finished(1)
                state.tracker.finished(3)
                t0 = anyio.current_time()
                await state.flush()
                flushed_after.append(anyio.current_time() - t0)
                assert not state.tracker.pending
                await all_read.wait()
    assert flushed_after == [SETTLE_TIMEOUT]  # a bounded wait, not one per ack
    assert acks == [(1, False), (3, False)]


@autojump()
async def test_a_blocked_publishing_connection_never_holds_up_the_acks(
    anyio_backend: Any,
) -> None:
    """Retry copies go out on a connection of their own. Here the broker blocks that
    connection (connection.blocked, no confirm ever): the copy of message 1 waits,
    message 2's ack goes out on the consumers' connection at once, and after
    SETTLE_TIMEOUT (plus the 1 s pause) message 1 is requeued. Before, copies shared
    the consumers' connection, which a memory alarm blocks as a whole."""
    shutdown = Shutdown()
    times: dict[str, float] = {}
    t0 = 0.0

    async def handler(msg: Message) -> None:
        if msg.body == b"fails":
            raise ValueError("try again later")

    async def script(broker: FakeBroker) -> None:
        nonlocal t0
        [tag] = await serve_startup(broker, [spec])
        t0 = anyio.current_time()
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 1, b"fails")
        await copy_waiting.wait()
        await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, 2, b"works")
        ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
        times["ack 2"] = anyio.current_time() - t0
        assert (ack.delivery_tag, ack.multiple) == (2, False)
        nack = await broker.expect(commands.Basic.Nack, FIRST_CONSUMER_CHANNEL)
        times["requeue 1"] = anyio.current_time() - t0
        assert (nack.delivery_tag, nack.requeue) == (1, True)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    async def publishing(broker: FakeBroker) -> None:
        await serve_publishing_startup(broker)
        await broker.send(0, commands.Connection.Blocked("low on memory"))
        method, _ = await broker.expect_publish(PUBLISH_CHANNEL)
        assert method.routing_key == "orders.retry.1000"
        copy_waiting.set()
        assert_publishing_shutdown(await serve_until_closed(broker))  # never confirmed

    copy_waiting = anyio.Event()
    spec = spec_for(handler, retry=Retry(delays=(1.0,)))
    recorder = Recorder()
    async with anyio.create_task_group() as tg:
        await make_supervisor(
            Connector(tg, [script, publishing]), [spec], shutdown=shutdown, recorder=recorder
        ).run()
    assert times == {"ack 2": 0.0, "requeue 1": SETTLE_TIMEOUT + SETTLE_FAILURE_PAUSE}
    assert sorted(kind.value for _, kind in recorder.outcomes) == ["ack", "requeue"]


# -- 4. a user's 404 does not close the next publishing channel --------------------------------


async def test_a_publish_during_the_reopen_after_a_404_gets_the_new_channel(
    anyio_backend: Any,
) -> None:
    """A publish to a missing exchange closes the publishing channel (404). A publish
    issued while the channel is being reopened used to find the old closed channel,
    break the new one as soon as it opened (the broken event had already been
    replaced), and fail with ``LocalProtocolError('channel 1 is closed')``."""
    client, broker = pair()
    reopening = anyio.Event()
    frames: list[str] = []

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await broker.expect(commands.Confirm.Select, 1)
        await broker.send(1, commands.Confirm.SelectOk())
        method, _ = await broker.expect_publish(1)
        assert method.exchange == "missing"
        await broker.send(
            1, commands.Channel.Close(404, "NOT_FOUND - no exchange 'missing'", 60, 40)
        )
        await broker.expect(commands.Channel.CloseOk, 1)
        await broker.expect(commands.Channel.Open, 1)
        reopening.set()
        await anyio.sleep(0.1)  # the open-ok is late: the publish below waits for it
        await broker.send(1, commands.Channel.OpenOk())
        await broker.expect(commands.Confirm.Select, 1)
        await broker.send(1, commands.Confirm.SelectOk())
        got = await broker.receive_frame()
        frames.append(getattr(got.frame, "name", type(got.frame).__name__))
        if isinstance(got.frame, commands.Basic.Publish):
            await broker.receive_frame()  # its content header
            await broker.receive_frame()  # and body
            await broker.send(1, commands.Basic.Ack(1))
        while True:
            try:
                got = await broker.receive_frame()
            except ClientClosed:
                return
            frames.append(getattr(got.frame, "name", type(got.frame).__name__))
            if isinstance(got.frame, commands.Channel.Close):
                await broker.send(got.channel, commands.Channel.CloseOk())
            elif isinstance(got.frame, commands.Connection.Close):
                await broker.send(0, commands.Connection.CloseOk())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(broker.serve, script)
            async with connect_stream(client, PARAMS) as conn:
                channel = PublishChannel()
                async with anyio.create_task_group() as publishing:
                    await publishing.start(channel.run, conn)
                    with pytest.raises(ChannelClosed) as caught:
                        await channel.publish(
                            b"a",
                            exchange="missing",
                            routing_key="k",
                            properties=None,
                            mandatory=True,
                        )
                    assert caught.value.reply_code == 404
                    await reopening.wait()
                    await channel.publish(
                        b"b", exchange="", routing_key="q", properties=None, mandatory=True
                    )
                    publishing.cancel_scope.cancel()
    assert frames == ["Basic.Publish", "Channel.Close", "Connection.Close"]


# -- 2. each consumer is its own failure domain ----------------------------------------------


@autojump()
async def test_after_a_reconnect_one_failing_queue_does_not_stop_the_others(
    anyio_backend: Any,
) -> None:
    """After start-up the connection is lost; on the next one queue ``orders`` cannot
    be declared (404: its quorum queue's node is down) and then not consumed (403).
    ``invoices`` subscribes and handles its message meanwhile; ``orders`` retries
    with backoff on its own channel and subscribes once the broker takes it again;
    the App never reconnects for it and is not ready until then. Before, the failed
    declaration ended the whole session and the App reconnected for ever."""
    shutdown = Shutdown()
    handled: list[tuple[str, float]] = []
    orders_refusals = {"declare": 2, "consume": 1}
    seen: dict[str, Any] = {}
    ready = anyio.Event()

    async def handler(msg: Message) -> None:
        handled.append((msg.queue, anyio.current_time()))

    async def first(broker: FakeBroker) -> None:
        await serve_startup(broker, specs)
        await ready.wait()
        await broker.send_eof()  # the connection is lost, after start-up
        await broker.expect_eof()

    async def second(broker: FakeBroker) -> None:
        await broker.handshake()
        consumers: dict[int, str] = {}
        delivered = 0
        while True:
            try:
                got = await broker.receive_frame()
            except ClientClosed:
                return
            ch, frame = got.channel, got.frame
            if isinstance(frame, commands.Channel.Open):
                await broker.send(ch, commands.Channel.OpenOk())
            elif isinstance(frame, commands.Basic.Qos):
                await broker.send(ch, commands.Basic.QosOk())
            elif isinstance(frame, commands.Queue.Declare):
                if frame.queue.startswith("orders") and orders_refusals["declare"]:
                    orders_refusals["declare"] -= 1
                    text = f"NOT_FOUND - home node of queue '{frame.queue}' is down"
                    await broker.send(ch, commands.Channel.Close(404, text, 50, 10))
                else:
                    await broker.send(ch, commands.Queue.DeclareOk(frame.queue, 0, 0))
            elif isinstance(frame, commands.Basic.Consume):
                if frame.queue == "orders" and orders_refusals["consume"]:
                    orders_refusals["consume"] -= 1
                    text = "ACCESS_REFUSED - queue 'orders' in exclusive use"
                    await broker.send(ch, commands.Channel.Close(403, text, 60, 20))
                    continue
                consumers[ch] = frame.queue
                await broker.send(ch, commands.Basic.ConsumeOk(frame.consumer_tag))
                delivered += 1
                await broker.deliver(ch, frame.consumer_tag or "", 1, frame.queue.encode())
            elif isinstance(frame, commands.Basic.Ack):
                if consumers[ch] == "invoices":
                    seen["subscribed when invoices acked"] = set(supervisor.subscribed)
                    seen["ready when invoices acked"] = supervisor.ready
                if delivered == 2:
                    seen["ready at the end"] = supervisor.ready
                    shutdown.request(5.0)
            elif isinstance(frame, commands.Basic.Cancel):
                await broker.send(ch, commands.Basic.CancelOk(frame.consumer_tag))
            elif isinstance(frame, commands.Channel.Close):
                await broker.send(ch, commands.Channel.CloseOk())
            elif isinstance(frame, commands.Connection.Close):
                await broker.send(0, commands.Connection.CloseOk())

    specs = [spec_for(handler, "orders"), spec_for(handler, "invoices")]
    with anyio.fail_after(600):
        async with anyio.create_task_group() as tg:
            connector = Connector(tg, [first, second])
            supervisor = make_supervisor(connector, specs, shutdown=shutdown, rng=random.Random(4))
            await tg.start(supervisor.run)
            ready.set()
    assert [queue for queue, _ in handled] == ["invoices", "orders"]
    assert handled[1][1] > handled[0][1]  # orders came back after its backoff
    assert seen == {
        "subscribed when invoices acked": {"invoices"},
        "ready when invoices acked": False,
        "ready at the end": True,
    }
    assert orders_refusals == {"declare": 0, "consume": 0}
    assert len(connector.calls) == 2
    assert supervisor.reconnects == 1


# -- 3. a stop never hangs on a broker that does not answer ---------------------------------


async def serve_declarations(broker: FakeBroker, spec: ConsumerSpec) -> None:
    await broker.handshake()
    await broker.open_channel(1)
    for _ in declarations(spec):
        declare = await broker.expect(commands.Queue.Declare, 1)
        await broker.send(1, commands.Queue.DeclareOk(declare.queue, 0, 0))
    await broker.close_channel(1)


async def answer_closes(broker: FakeBroker, seen: list[tuple[float, int, str]]) -> None:
    """Answer channel and connection closes (nothing else) until the client is gone."""
    while True:
        try:
            got = await broker.receive_frame()
        except ClientClosed:
            return
        seen.append((got.time, got.channel, getattr(got.frame, "name", "?")))
        if isinstance(got.frame, commands.Channel.Close):
            await broker.send(got.channel, commands.Channel.CloseOk())
        elif isinstance(got.frame, commands.Connection.Close):
            await broker.send(0, commands.Connection.CloseOk())


@autojump()
async def test_a_stop_ends_while_the_broker_never_answers_basic_qos(anyio_backend: Any) -> None:
    """The broker keeps the connection but never answers the consumer's basic.qos. A
    graceful stop at t=1 must end the run at once (it cancels the set-up), and in
    any case a second stop at t=2 must. Before, the set-up ran outside any scope a
    stop cancels and had no deadline: the run never ended."""
    shutdown = Shutdown()
    seen: list[tuple[float, int, str]] = []
    returned_at: list[float] = []

    async def script(broker: FakeBroker) -> None:
        await serve_declarations(broker, spec)
        await broker.open_channel(FIRST_CONSUMER_CHANNEL)
        await broker.expect(commands.Basic.Qos, FIRST_CONSUMER_CHANNEL)  # never answered
        await answer_closes(broker, seen)

    async def stop() -> None:
        await anyio.sleep(1.0)
        shutdown.request(30.0)
        await anyio.sleep(1.0)
        shutdown.force()

    spec = spec_for(_noop)
    with anyio.fail_after(600):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            t0 = anyio.current_time()
            await make_supervisor(Connector(tg, [script]), [spec], shutdown=shutdown).run()
            returned_at.append(anyio.current_time() - t0)
            tg.cancel_scope.cancel()
    assert returned_at == [1.0]
    assert [(t - t0, ch, name) for t, ch, name in seen] == [
        (1.0, FIRST_CONSUMER_CHANNEL, "Channel.Close"),
        (1.0, 0, "Connection.Close"),
    ]


@autojump()
async def test_an_unanswered_basic_qos_gives_up_its_channel_after_the_call_timeout(
    anyio_backend: Any,
) -> None:
    """Every synchronous call has a deadline: the unanswered basic.qos fails after
    CALL_TIMEOUT, the channel is closed, and the consumer subscribes again on a new
    one (after a backoff of 0 s here)."""
    shutdown = Shutdown()
    times: dict[str, float] = {}

    async def script(broker: FakeBroker) -> None:
        await serve_declarations(broker, spec)
        t0 = anyio.current_time()
        await broker.open_channel(FIRST_CONSUMER_CHANNEL)
        await broker.expect(commands.Basic.Qos, FIRST_CONSUMER_CHANNEL)  # never answered
        await broker.close_channel(FIRST_CONSUMER_CHANNEL)
        times["closed"] = anyio.current_time() - t0
        await broker.open_channel(FIRST_CONSUMER_CHANNEL)
        await broker.expect(commands.Basic.Qos, FIRST_CONSUMER_CHANNEL)
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.QosOk())
        for _ in declarations(spec):  # declared again on its own channel
            declare = await broker.expect(commands.Queue.Declare, FIRST_CONSUMER_CHANNEL)
            await broker.send(FIRST_CONSUMER_CHANNEL, commands.Queue.DeclareOk(declare.queue, 0, 0))
        consume = await broker.expect(commands.Basic.Consume, FIRST_CONSUMER_CHANNEL)
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.ConsumeOk(consume.consumer_tag))
        times["subscribed"] = anyio.current_time() - t0
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    spec = spec_for(_noop)
    with anyio.fail_after(600):
        async with anyio.create_task_group() as tg:
            await make_supervisor(Connector(tg, [script]), [spec], shutdown=shutdown).run()
    assert times == {"closed": CALL_TIMEOUT, "subscribed": CALL_TIMEOUT}


async def _noop(msg: Message) -> None:
    pass


# -- 6. ad-hoc retry queues: bounded, expiring, their lease renewed before use ----------------


@autojump()
async def test_an_ad_hoc_retry_queue_is_declared_again_before_its_lease_runs_out(
    anyio_backend: Any,
) -> None:
    """An ad-hoc retry queue expires once unused (``x-expires``), and publishing does
    not renew that lease: a copy published to it just before it expires would be
    deleted with it. So it is declared again before a publish once our last
    declaration is ``AD_HOC_LEASE_RENEWAL`` old, and not before."""
    shutdown = Shutdown()
    delivered_at = [0.0, AD_HOC_LEASE_RENEWAL / 2, AD_HOC_LEASE_RENEWAL + 1]
    copies: list[tuple[float, str]] = []

    async def handler(msg: Message) -> None:
        raise RetryLater(delay=2.5)

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        t0 = anyio.current_time()
        for n, when in enumerate(delivered_at, 1):
            await anyio.sleep_until(t0 + when)
            await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, n, b"later")
            ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
            assert (ack.delivery_tag, ack.multiple) == (n, False)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    async def publishing(broker: FakeBroker) -> None:
        await serve_publishing_startup(broker)
        t0 = anyio.current_time()
        published = 0
        while published < len(delivered_at):
            got = await broker.receive_frame()
            if isinstance(got.frame, commands.Queue.Declare):
                copies.append((got.time - t0, "declare"))
                await broker.send(PUBLISH_CHANNEL, commands.Queue.DeclareOk(got.frame.queue, 0, 0))
            else:
                assert isinstance(got.frame, commands.Basic.Publish), got.frame
                assert got.frame.routing_key == "orders.retry.2500"
                await broker.receive_frame()  # the content header
                await broker.receive_frame()  # the body
                published += 1
                copies.append((got.time - t0, "publish"))
                await broker.send(PUBLISH_CHANNEL, commands.Basic.Ack(published))
        assert_publishing_shutdown(await serve_until_closed(broker))

    spec = spec_for(handler, retry=Retry(delays=(1.0,)))
    with anyio.fail_after(3 * AD_HOC_LEASE_RENEWAL):
        async with anyio.create_task_group() as tg:
            await make_supervisor(
                Connector(tg, [script, publishing]), [spec], shutdown=shutdown
            ).run()
    assert copies == [
        (0.0, "declare"),
        (0.0, "publish"),
        (AD_HOC_LEASE_RENEWAL / 2, "publish"),
        (AD_HOC_LEASE_RENEWAL + 1, "declare"),
        (AD_HOC_LEASE_RENEWAL + 1, "publish"),
    ]


# -- 9. smaller ones --------------------------------------------------------------------------


@autojump()
async def test_a_backoff_cut_short_by_a_lost_connection_leaves_no_intake_scope_behind(
    anyio_backend: Any,
) -> None:
    """The broker cancels the consumer, which waits its backoff in an intake scope
    (so that a stop ends the wait); the connection is lost meanwhile, which cancels
    that wait from outside. The scope must be forgotten then too: it was discarded
    only after a wait that ended normally, and every such loss left one more behind
    in the App's Shutdown."""
    shutdown = Shutdown()
    intakes: list[int] = []

    async def first(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        await broker.send(FIRST_CONSUMER_CHANNEL, commands.Basic.Cancel(tag, nowait=True))
        await broker.close_channel(FIRST_CONSUMER_CHANNEL)
        await anyio.sleep(0.1)  # the consumer waits its backoff (0.42 s) ...
        await broker.send_eof()  # ... when the connection is lost
        await broker.expect_eof()

    async def second(broker: FakeBroker) -> None:
        await serve_startup(broker, [spec])
        intakes.append(len(shutdown._intakes))  # the new subscription's only
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    spec = spec_for(_noop)
    assert DEFAULT_BACKOFF.delay(0, random.Random(0).random()) > 0.1
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            connector = Connector(tg, [first, second])
            await make_supervisor(connector, [spec], shutdown=shutdown, rng=random.Random(0)).run()
    assert intakes == [1]
    assert not shutdown._intakes


@pytest.mark.broker
async def test_run_inside_running_raises_and_leaving_the_block_still_stops(
    anyio_backend: Any, broker_url: str
) -> None:
    """``app.run()`` inside ``app.running()`` raised, but had replaced the App's
    shutdown first: leaving the block then stopped nothing and hung."""
    oracle = Oracle(broker_url)
    queue = f"sc-twice-{uuid.uuid4().hex}"
    app = sc.App(url=broker_url, grace_period=1.0)

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        pass

    try:
        with anyio.fail_after(15):
            async with app.running():
                with pytest.raises(RuntimeError, match="running already"):
                    await app.run(handle_signals=False)
        assert not app.is_running
    finally:
        for name in (queue, f"{queue}.dlq"):
            await oracle.delete(name)


@pytest.mark.broker
async def test_a_publisher_outside_a_running_app_tries_every_url(
    anyio_backend: Any, broker_url: str
) -> None:
    """Outside a running App, ``app.publisher()`` connected to the first URL only: a
    cluster whose first node is down could not publish."""
    oracle = Oracle(broker_url)
    queue = f"sc-urls-{uuid.uuid4().hex}"
    await oracle.declare(queue)
    try:
        app = sc.App(url=["amqp://guest:guest@127.0.0.1:1/", broker_url])
        with anyio.fail_after(15):
            async with app.publisher() as pub:
                await pub.publish(b"to the second node", routing_key=queue)
        assert await oracle.message_count(queue) == 1
    finally:
        await oracle.delete(queue)


# -- 8. a classic consumer's retry hop is at-least-once ----------------------------------------


#: RabbitMQ's default ``dead_letter_worker_publisher_confirm_timeout`` (ms, 3.10 to 4.3).
#: The test sets it back, never unsets it: a quorum queue's dead-letter worker reads
#: it without a default, and crashes on start without it.
DEAD_LETTER_RETRY_DEFAULT = 180_000


def set_dead_letter_retry(ms: int) -> None:
    key = "dead_letter_worker_publisher_confirm_timeout"
    dev_broker("ctl", "eval", f"application:set_env(rabbit, {key}, {ms}).")


@pytest.mark.broker
async def test_a_retry_refused_by_a_full_classic_queue_waits_until_it_has_room(
    anyio_backend: Any, broker_url: str, broker_ctl: None
) -> None:
    """A classic queue with ``x-max-length=1`` and ``x-overflow=reject-publish`` is
    full when a retried copy's delay is over: the broker's dead-lettering back to it
    is refused. From a classic retry queue (at-most-once) the copy was dropped: lost.
    From a quorum retry queue with at-least-once dead-lettering it is kept, and
    reaches the queue once there is room. (The broker tries a refused copy again after
    ``dead_letter_worker_publisher_confirm_timeout``, 3 min by default: this test
    sets it to 1 s on the private broker, before the retry queue's worker starts.)"""
    oracle = Oracle(broker_url)
    queue = f"sc-full-{uuid.uuid4().hex}"
    retry_queue = f"{queue}.retry.3000"
    seen: list[tuple[bytes, int]] = []
    await anyio.to_thread.run_sync(set_dead_letter_retry, 1000)
    try:
        app = sc.App(url=broker_url, grace_period=2.0)

        @app.consumer(
            queue,
            retry=sc.Retry(delays=(3.0,)),
            timeout=5.0,
            arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
        )
        async def handle(msg: sc.Message) -> None:
            seen.append((msg.body, msg.attempt))
            if msg.body == b"m" and msg.attempt == 1:
                raise ValueError("fails once")

        async def copy_waiting() -> bool:
            return await oracle.message_count(retry_queue) == 1

        async with app.running():
            await oracle.publish(queue, b"m")
            await wait_until(copy_waiting, within=2.5, what="the copy in the retry queue")
        # Nobody consumes now: the filler makes the queue full before the copy expires.
        await oracle.publish(queue, b"filler")
        await anyio.sleep(4.0)  # the copy's 3 s are over: the full queue refused it
        assert await oracle.message_count(queue) == 1

        async def all_seen() -> bool:
            return len(seen) == 3

        async with app.running():
            await wait_until(all_seen, within=20, what="the retried copy handled")
    finally:
        await anyio.to_thread.run_sync(set_dead_letter_retry, DEAD_LETTER_RETRY_DEFAULT)
        for name in (queue, f"{queue}.dlq", retry_queue):
            await oracle.delete(name)
    assert seen == [(b"m", 1), (b"filler", 1), (b"m", 2)]
