"""Regression tests for the fixes of the framework review (commit 15e42c9).

One test (or two) per fix, each of which fails on the code before it:

1. a lost connection while a handler fails: the App is ready again within seconds (no
   busy loop on the dead publishing channel until ``SETTLE_TIMEOUT``), and a user
   publish issued while disconnected goes out on the next connection;
2. a stop while one consumer is subscribed and another not yet: the running handler
   gets the grace period, and leaving does not wait 5 s per channel (fake broker);
3. ordered acks: a second flush while the first waits sends nothing out of order;
4. a handler that swallows its timeout's cancellation is a TimeoutError, not an ack
   (and one that swallows the cancellation at the end of the grace period is requeued);
5. SystemExit from a handler: the message is requeued, the other consumers' handlers
   finish within the grace period, then ``app.run()`` raises SystemExit bare;
6. an ``x-attempt`` header of ``'²'`` is attempt 1 and does not crash the dispatcher;
7. a Publisher from inside ``app.running()`` raises RuntimeError after the App stopped
   (also a publish that was waiting for a reconnect when the App stopped);
8. a 403 on basic.consume at start-up (an exclusive consumer holds the queue) is a
   StartupError.

The last test is of a gap the review's fixes left: leaving ``app.running()`` under an
outer cancellation still waits ``CLOSE_TIMEOUT`` for replies that cannot come.

Tests on the real broker use unique queue names (uuid), deleted afterwards; the
connection cut of test 1 goes through an in-process TCP proxy the test closes.
"""

from __future__ import annotations

import contextlib
import math
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc
import pytest
import trio.testing
from pamqp import commands

import strictconsume as sc
from strictconsume._dispatch import _ChannelState
from strictconsume.amqp import (
    ChannelClosed,
    ConnectionLost,
    ConnectionParameters,
    connect,
    connect_stream,
)

from ..amqp.fake_broker import ClientClosed, FakeBroker, pair
from ..amqp.oracle import Oracle

if TYPE_CHECKING:
    from strictconsume.amqp import Channel, Connection

pytestmark = [pytest.mark.broker, pytest.mark.anyio]

#: How long any awaited condition on the real broker may take before the test fails.
DEADLINE = 10.0
#: Every retry delay this file uses, in ms: the teardown deletes ``<queue>.retry.<ms>``.
RETRY_MS = (200,)


def autojump() -> pytest.MarkDecorator:
    """Run on trio only, with a MockClock that jumps whenever every task is blocked."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-autojump")]
    )


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def oracle(broker_url: str) -> Oracle:
    return Oracle(broker_url)


class Names:
    """Unique queue names; each queue, its .dlq and retry queues are deleted afterwards."""

    def __init__(self) -> None:
        self.queues: list[str] = []

    def queue(self) -> str:
        name = f"sc-review-{uuid.uuid4().hex}"
        self.queues.append(name)
        return name


@pytest.fixture
def names(oracle: Oracle) -> Iterator[Names]:
    made = Names()
    yield made
    for queue in made.queues:
        for name in (queue, f"{queue}.dlq", *(f"{queue}.retry.{ms}" for ms in RETRY_MS)):
            oracle.delete_now(name)


def main_queue_arguments(queue: str) -> dict[str, Any]:
    """The arguments the App declares a classic consumer queue with."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dlq"}


async def wait_until(holds: Callable[[], bool], *, within: float = DEADLINE, what: str) -> None:
    """Poll ``holds`` until it is true; fail the test after ``within`` seconds."""
    try:
        with anyio.fail_after(within):
            while True:
                if holds():
                    return
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {within:g} s: {what}") from None


async def wait_for_count(oracle: Oracle, queue: str, count: int) -> None:
    with anyio.fail_after(DEADLINE):
        while True:
            if await oracle.message_count(queue) == count:
                return
            await anyio.sleep(0.05)


class Proxy:
    """A TCP proxy to the broker; :meth:`cut` drops every connection through it (new
    connections are forwarded again)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.target_port = port
        self.port = 0
        self.connections = 0
        #: While set, new connections are closed at once (the broker is unreachable).
        self.refusing = False
        self._streams: list[anyio.abc.SocketStream] = []

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._forward)

    async def _forward(self, client: anyio.abc.SocketStream) -> None:
        if self.refusing:
            await anyio.aclose_forcefully(client)
            return
        try:
            server = await anyio.connect_tcp(self.host, self.target_port)
        except OSError:
            await anyio.aclose_forcefully(client)
            return
        self.connections += 1
        self._streams += [client, server]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pump, client, server)
            tg.start_soon(self._pump, server, client)

    @staticmethod
    async def _pump(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
        try:
            async for chunk in source:
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            await anyio.aclose_forcefully(sink)
            await anyio.aclose_forcefully(source)

    async def cut(self) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            await anyio.aclose_forcefully(stream)


@contextlib.asynccontextmanager
async def proxied(broker_url: str) -> AsyncIterator[tuple[Proxy, str]]:
    """A running :class:`Proxy` to the broker and the AMQP URL through it."""
    parts = urllib.parse.urlsplit(broker_url)
    assert parts.hostname is not None
    proxy = Proxy(parts.hostname, parts.port or 5672)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = (
            f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
        )
        yield proxy, urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        tg.cancel_scope.cancel()


# -- 1. a lost connection: no busy loop on the dead publishing channel -----------------------


class HeldHandler:
    """The handler of the lost-connection tests: the message ``b"first"`` (not
    redelivered) keeps it running, shielded, across the cut until :attr:`release` is
    set, then it fails (or returns); every other message is acked."""

    def __init__(self, *, fail: bool) -> None:
        self.fail = fail
        self.handled: list[tuple[bytes, bool]] = []
        self.running = anyio.Event()
        self.release = anyio.Event()
        self.user_handled = anyio.Event()

    async def handle(self, msg: sc.Message) -> None:
        self.handled.append((msg.body, msg.redelivered))
        if msg.body == b"user":
            self.user_handled.set()
        if msg.body == b"first" and not msg.redelivered:
            self.running.set()
            # Still running when the connection goes: it ends while the old connection
            # is winding down.
            with anyio.CancelScope(shield=True), anyio.move_on_after(DEADLINE):
                await self.release.wait()
                await anyio.sleep(0.2)
            if self.fail:
                raise ValueError("failed after the connection was lost")


async def test_handler_failing_after_a_lost_connection_does_not_hold_up_the_reconnect(
    anyio_backend: Any, broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    handler = HeldHandler(fail=True)
    async with proxied(broker_url) as (proxy, url):
        app = sc.App(url=url, grace_period=2.0)

        @app.consumer(queue, retry=sc.Retry(delays=()), timeout=30.0)
        async def handle(msg: sc.Message) -> None:
            await handler.handle(msg)

        async with app.running():
            await oracle.publish(queue, b"first")
            with anyio.fail_after(DEADLINE):
                await handler.running.wait()
            cut_at, cpu_at = time.monotonic(), time.process_time()
            await proxy.cut()
            await anyio.sleep(0.3)  # the client reads the EOF: it is disconnected
            handler.release.set()
            # Settling the failed message on the dead publishing channel used to spin
            # until SETTLE_TIMEOUT (10 s) before the App could reconnect.
            await wait_until(
                lambda: app.ready and app.reconnects >= 1,
                within=5.0,
                what="ready again after the cut",
            )
            ready_after = time.monotonic() - cut_at
            cpu = time.process_time() - cpu_at
            # The failed message was requeued, not lost: it comes again and is acked.
            await wait_until(
                lambda: (b"first", True) in handler.handled, what="the message redelivered"
            )
            assert app.reconnects == 1

    assert ready_after < 5.0
    assert cpu < 0.5 + 0.5 * ready_after, f"{cpu:.2f} s of CPU in {ready_after:.2f} s"
    assert proxy.connections == 2
    await wait_for_count(oracle, queue, 0)
    assert await oracle.message_count(f"{queue}.dlq") == 0


async def test_publish_while_disconnected_goes_out_on_the_next_connection(
    anyio_backend: Any, broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    handler = HeldHandler(fail=False)
    async with proxied(broker_url) as (proxy, url):
        app = sc.App(url=url, grace_period=2.0)

        @app.consumer(queue, retry=sc.Retry(delays=()), timeout=30.0)
        async def handle(msg: sc.Message) -> None:
            await handler.handle(msg)

        async with app.running(), app.publisher() as pub:
            await oracle.publish(queue, b"first")
            with anyio.fail_after(DEADLINE):
                await handler.running.wait()
            published_after: list[float] = []
            errors: list[BaseException] = []

            async def user_publish() -> None:
                try:
                    await pub.publish(b"user", routing_key=queue)
                    published_after.append(time.monotonic() - cut_at)
                except Exception as exc:
                    errors.append(exc)

            cut_at = time.monotonic()
            await proxy.cut()
            await anyio.sleep(0.3)  # the client reads the EOF: it is disconnected
            # Issued while the old connection winds down (its handler still runs): it
            # used to wait forever on that connection's dead publishing channel.
            with anyio.fail_after(5.0):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(user_publish)
                    handler.release.set()
            assert not errors
            with anyio.fail_after(DEADLINE):
                await handler.user_handled.wait()
            assert app.reconnects == 1

    assert published_after[0] < 5.0
    # The consumers' connection, made again after the cut, and the publishing
    # connection, opened when the user first published.
    assert proxy.connections == 3
    assert handler.handled.count((b"user", False)) == 1
    await wait_for_count(oracle, queue, 0)


# -- 2. a stop before every consumer subscribed: the grace period still holds ----------------


@autojump()
async def test_stop_while_a_consumer_is_still_subscribing_keeps_the_grace_period(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = "orders", "invoices"
    frames: list[tuple[int, object]] = []
    handler_started = anyio.Event()
    second_consume_pending = anyio.Event()
    handler_done: list[bytes] = []
    calls: list[ConnectionParameters] = []
    channels: dict[str, int] = {}

    async def script(broker: FakeBroker) -> None:
        await broker.handshake()
        await broker.open_channel(1)
        while True:  # the declarations, on channel 1
            got = await broker.receive_frame()
            if isinstance(got.frame, commands.Queue.Declare):
                await broker.send(1, commands.Queue.DeclareOk(got.frame.queue, 0, 0))
                continue
            assert isinstance(got.frame, commands.Channel.Close), got.frame
            await broker.send(1, commands.Channel.CloseOk())
            break
        # The consumers subscribe at once: the first gets a message; the second
        # one's consume-ok is late (it comes when the client cancels).
        late: commands.Basic.Consume | None = None
        while late is None or not channels.get(first):
            got = await broker.receive_frame()
            channel, frame = got.channel, got.frame
            if isinstance(frame, commands.Channel.Open):
                await broker.send(channel, commands.Channel.OpenOk())
            elif isinstance(frame, commands.Basic.Qos):
                await broker.send(channel, commands.Basic.QosOk())
            else:
                assert isinstance(frame, commands.Basic.Consume), frame
                channels[frame.queue] = channel
                if frame.queue == first:
                    await broker.send(channel, commands.Basic.ConsumeOk(frame.consumer_tag))
                    await broker.deliver(channel, frame.consumer_tag, 1, b"in flight")
                else:
                    assert frame.queue == second
                    late = frame
        second_consume_pending.set()
        while True:
            try:
                got = await broker.receive_frame()
            except ClientClosed:
                return
            frames.append((got.channel, got.frame))
            frame = got.frame
            if isinstance(frame, commands.Basic.Cancel):
                if got.channel == channels[second]:
                    await broker.send(got.channel, commands.Basic.ConsumeOk(late.consumer_tag))
                await broker.send(got.channel, commands.Basic.CancelOk(frame.consumer_tag))
            elif isinstance(frame, commands.Channel.Close):
                await broker.send(got.channel, commands.Channel.CloseOk())
            elif isinstance(frame, commands.Connection.Close):
                await broker.send(0, commands.Connection.CloseOk())

    app = sc.App(url="amqp://alice:secret@rabbit.invalid:5672/?heartbeat=0", grace_period=10.0)

    @app.consumer(first, retry=sc.Retry(delays=()), timeout=60.0)
    async def handle_first(msg: sc.Message) -> None:
        handler_started.set()
        await anyio.sleep(2.0)
        handler_done.append(msg.body)

    @app.consumer(second, retry=sc.Retry(delays=()), timeout=60.0)
    async def handle_second(msg: sc.Message) -> None:
        pass

    async with anyio.create_task_group() as tg:

        @contextlib.asynccontextmanager
        async def fake_connect(params: ConnectionParameters) -> AsyncIterator[Connection]:
            calls.append(params)
            if len(calls) > 1:
                raise ConnectionLost("only one connection is planned")
            client, broker = pair()

            async def serve() -> None:
                await script(broker)

            tg.start_soon(broker.serve, serve)
            async with connect_stream(client, params) as conn:
                yield conn

        monkeypatch.setattr("strictconsume._supervisor.connect", fake_connect)
        stopped = anyio.Event()

        async def run_app() -> None:
            try:
                await app.run(handle_signals=False)
            finally:
                stopped.set()

        tg.start_soon(run_app)
        with anyio.fail_after(60):
            await handler_started.wait()
            await second_consume_pending.wait()
        assert not app.ready  # the second consumer has not subscribed
        assert not handler_done
        stop_at = anyio.current_time()
        app.stop()
        with anyio.fail_after(60):
            await stopped.wait()
        took = anyio.current_time() - stop_at

    assert handler_done == [b"in flight"]  # it had its grace period
    assert 2.0 <= took < 3.0  # the handler's 2 s, not 5 s of waiting per channel
    acks = [(ch, f.delivery_tag) for ch, f in frames if isinstance(f, commands.Basic.Ack)]
    assert acks == [(channels[first], 1)]
    assert not [f for _, f in frames if isinstance(f, commands.Basic.Nack)]
    assert len(calls) == 1


# -- 3. ordered acks: one flush at a time ---------------------------------------------------


class BlockingAckChannel:
    """A channel whose socket is backed up: acks are queued at once, and the first
    wait for the socket to drain waits until released."""

    is_open = True

    def __init__(self) -> None:
        self.sent: list[tuple[int, bool]] = []
        self.first_ack_waiting = anyio.Event()
        self.release = anyio.Event()

    def ack_nowait(self, delivery_tag: int, *, multiple: bool = False, batch: bool = False) -> None:
        self.sent.append((delivery_tag, multiple))

    def send_queued(self) -> None:
        pass  # the socket takes nothing now: the writer would send it later

    @property
    def writable(self) -> bool:
        return self.release.is_set()

    async def wait_writable(self) -> None:
        if not self.first_ack_waiting.is_set():
            self.first_ack_waiting.set()
            await self.release.wait()


def check_acks_against_the_broker(delivered: range, sent: list[tuple[int, bool]]) -> None:
    """Replay ``sent`` against the broker's unacked set: acking a tag that is no longer
    unacked (406 PRECONDITION_FAILED, unknown delivery tag) fails."""
    unacked = set(delivered)
    for tag, multiple in sent:
        assert tag in unacked, f"ack({tag}, multiple={multiple}) of a settled tag in {sent}"
        if multiple:
            unacked -= {t for t in unacked if t <= tag}
        else:
            unacked.discard(tag)


async def test_a_second_flush_never_sends_acks_out_of_order(anyio_backend: Any) -> None:
    ch = BlockingAckChannel()
    state = _ChannelState(cast("Channel", ch), prefetch=8, concurrency=None)
    for tag in range(1, 9):
        state.tracker.received(tag)
    for tag in (1, 2, 3, 4, 6, 7):
        state.tracker.finished(tag)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            # The acker queues ack(4, multiple), ack(6), ack(7), then waits for the socket.
            tg.start_soon(state.flush)
            await ch.first_ack_waiting.wait()
            # Meanwhile the last two handlers finish; the last one flushes itself.
            try:
                state.tracker.finished(8)
                state.tracker.finished(5)
                await state.flush()
                # Queued behind the first flush's frames, without waiting for it.
                assert ch.sent == [(4, True), (6, False), (7, False), (8, True)]
            finally:
                ch.release.set()
    check_acks_against_the_broker(range(1, 9), ch.sent)
    assert not state.tracker.pending


# -- 4. a handler that swallows its timeout's cancellation ----------------------------------


async def test_handler_swallowing_its_timeout_is_a_timeout_error_not_an_ack(
    anyio_backend: Any, broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=1.0)
    calls: list[int] = []

    @app.consumer(queue, timeout=0.3, retry=sc.Retry(delays=(0.2,)))
    async def handle(msg: sc.Message) -> None:
        calls.append(msg.attempt)
        try:
            await anyio.sleep(DEADLINE)  # a library call that absorbs cancellation
        except anyio.get_cancelled_exc_class():
            return  # swallowed: the work was not done

    async with app.running():
        await oracle.publish(queue, b"slow")
        # Retried once through the retry queue, then dead-lettered: never acked.
        await wait_until(
            lambda: bool(app.outcomes[queue, "dead_letter"] or app.outcomes[queue, "ack"]),
            what="a final outcome",
        )

    assert calls == [1, 2]
    assert app.outcomes[queue, "retry"] == 1
    assert app.outcomes[queue, "dead_letter"] == 1
    assert app.outcomes[queue, "ack"] == 0
    dead = await oracle.get(f"{queue}.dlq")
    assert dead is not None
    assert dead.body == b"slow"
    assert dead.headers is not None
    assert dead.headers["x-error-type"] == "TimeoutError"
    assert dead.headers["x-attempt"] == 2
    assert await oracle.message_count(queue) == 0


async def test_handler_swallowing_the_grace_period_cancellation_is_requeued_not_acked(
    anyio_backend: Any, broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=0.3)
    running = anyio.Event()
    swallowed: list[bytes] = []

    @app.consumer(queue, timeout=30.0, retry=sc.Retry(delays=()))
    async def handle(msg: sc.Message) -> None:
        running.set()
        try:
            await anyio.sleep(DEADLINE)
        except anyio.get_cancelled_exc_class():
            swallowed.append(msg.body)
            return  # swallowed: the work was not done

    async with app.running():
        await oracle.publish(queue, b"unfinished")
        with anyio.fail_after(DEADLINE):
            await running.wait()
    # Leaving the block: the grace period (0.3 s) ends, the handler is cancelled.

    assert swallowed == [b"unfinished"]
    assert app.outcomes[queue, "ack"] == 0
    assert app.outcomes[queue, "cancelled"] == 1
    await wait_for_count(oracle, queue, 1)  # back in its queue
    assert await oracle.message_count(f"{queue}.dlq") == 0


# -- 5. SystemExit from a handler ------------------------------------------------------------


async def test_system_exit_from_a_handler_stops_gracefully_then_run_raises_it(
    anyio_backend: Any, broker_url: str, oracle: Oracle, names: Names
) -> None:
    exiting, slow_queue = names.queue(), names.queue()
    app = sc.App(url=broker_url, grace_period=10.0)
    slow_started = anyio.Event()
    slow_done: list[bytes] = []
    exits: list[int] = []

    @app.consumer(slow_queue, retry=sc.Retry(delays=()), timeout=30.0)
    async def slow(msg: sc.Message) -> None:
        slow_started.set()
        await anyio.sleep(1.0)
        slow_done.append(msg.body)

    @app.consumer(exiting, retry=sc.Retry(delays=()), timeout=30.0)
    async def exit_now(msg: sc.Message) -> None:
        exits.append(msg.attempt)
        raise SystemExit(3)

    async def feed() -> None:
        await wait_until(lambda: app.ready, what="the App ready")
        await oracle.publish(slow_queue, b"slow")
        with anyio.fail_after(DEADLINE):
            await slow_started.wait()
        await oracle.publish(exiting, b"exit")

    raised: BaseException | None = None
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(feed)
        try:
            with anyio.fail_after(DEADLINE):
                await app.run(handle_signals=False)
        except BaseException as exc:  # checked below, outside the except clause
            raised = exc
        took = anyio.current_time() - started
        tg.cancel_scope.cancel()

    # Bare, not inside an ExceptionGroup (asserted on the repr, so that pytest does not
    # format a deeply nested group, which crashed its reporting on the old code).
    assert type(raised) is SystemExit, f"app.run() raised {raised!r}, not SystemExit(3)"
    assert raised.code == 3
    assert exits
    assert slow_done == [b"slow"]  # the grace period held for the other consumer
    assert took < 5.0
    assert app.outcomes[slow_queue, "ack"] == 1
    assert app.outcomes[exiting, "requeue"] >= 1
    # The message went back to its queue (nothing dead-lettered, nothing lost).
    await wait_for_count(oracle, exiting, 1)
    assert await oracle.message_count(f"{exiting}.dlq") == 0
    assert await oracle.message_count(slow_queue) == 0


# -- 6. a superscript x-attempt header ------------------------------------------------------


async def test_superscript_attempt_header_is_attempt_one_and_no_reconnect(
    anyio_backend: Any, broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue, other = names.queue(), names.queue()
    app = sc.App(url=broker_url, grace_period=1.0)
    seen: list[tuple[bytes, int]] = []
    done = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.body, msg.attempt))
        if msg.body == b"after":
            done.set()

    @app.consumer(other, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle_other(msg: sc.Message) -> None:
        seen.append((msg.body, msg.attempt))

    async with app.running(), app.publisher() as pub:
        with anyio.fail_after(DEADLINE):
            await pub.publish(b"poison", routing_key=queue, headers={"x-attempt": "\u00b2"})
            await oracle.publish(queue, b"pika", headers={"x-attempt": "\u00b2"})
            for n in range(3):
                await pub.publish(b"other %d" % n, routing_key=other)
            await pub.publish(b"after", routing_key=queue)
            await done.wait()
        await wait_until(lambda: len(seen) >= 6, what="every message handled")
        assert app.reconnects == 0
        assert app.ready

    assert sorted(seen) == sorted(
        [
            (b"poison", 1),
            (b"pika", 1),
            (b"other 0", 1),
            (b"other 1", 1),
            (b"other 2", 1),
            (b"after", 1),
        ]
    )
    assert app.outcomes[queue, "ack"] == 3
    assert app.outcomes[other, "ack"] == 3
    assert await oracle.message_count(queue) == 0
    assert await oracle.message_count(f"{queue}.dlq") == 0


# -- 7. publishing after the App stopped ---------------------------------------------------


async def test_publish_after_the_app_stopped_raises_at_once(
    anyio_backend: Any, broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=1.0)

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        pass

    async with app.running(), app.publisher() as pub:
        await pub.publish(b"while running", routing_key=queue)

    with anyio.fail_after(2.0), pytest.raises(RuntimeError, match="stopped"):
        await pub.publish(b"after the stop", routing_key=queue)
    assert await oracle.message_count(queue) == 0


async def test_publish_waiting_for_a_reconnect_raises_when_the_app_stops(
    anyio_backend: Any, broker_url: str, names: Names
) -> None:
    queue = names.queue()
    async with proxied(broker_url) as (proxy, url):
        app = sc.App(url=url, grace_period=1.0)

        @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0)
        async def handle(msg: sc.Message) -> None:
            pass

        errors: list[BaseException] = []
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            async with app.running(), app.publisher() as pub:
                proxy.refusing = True
                await proxy.cut()
                await wait_until(lambda: not app.connected, what="the App disconnected")

                async def publish() -> None:
                    try:
                        await pub.publish(b"never sent", routing_key=queue)
                    except Exception as exc:
                        errors.append(exc)
                    finally:
                        done.set()

                tg.start_soon(publish)
                await anyio.sleep(0.1)
                assert not done.is_set()  # it waits for the App's next connection
            # The App stopped without connecting again: the publish gives up.
            with anyio.fail_after(2.0):
                await done.wait()

    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError), repr(errors[0])
    assert "stopped" in str(errors[0])


# -- 8. 403 on basic.consume at start-up ---------------------------------------------------


async def test_queue_held_by_an_exclusive_consumer_is_a_startup_error(
    anyio_backend: Any, broker_url: str, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=1.0)

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        pass

    async with connect(broker_url) as conn, conn.channel() as ch:
        await ch.queue_declare(queue, durable=True, arguments=main_queue_arguments(queue))
        async with ch.consume(queue, exclusive=True):
            started = anyio.current_time()
            with anyio.fail_after(5.0), pytest.raises(sc.StartupError) as exc_info:
                async with app.running():
                    pytest.fail("the App started on a queue it cannot consume from")
            took = anyio.current_time() - started

    assert took < 5.0
    cause = exc_info.value.__cause__
    assert isinstance(cause, ChannelClosed), repr(cause)
    assert cause.reply_code == 403
    assert "403" in str(exc_info.value)
    assert "\n" not in str(exc_info.value)
    assert not app.ready


# -- remaining: an outer cancellation still waits for replies that cannot come -------------


async def test_leaving_running_under_an_outer_cancellation_waits_for_no_reply(
    anyio_backend: Any, broker_url: str, oracle: Oracle, names: Names
) -> None:
    """An outer cancellation ends the connection's reader and writer, so no reply can
    come: closing must not wait ``CLOSE_TIMEOUT`` (5 s) for one. It still does (15 s
    before 15e42c9, 5 s after): ``Channel._cancel_consumer`` waits for basic.cancel-ok
    without looking at ``Connection._io_stopped``, and a channel close that started
    just before the reader ended is not cut short when it does."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=10.0)
    running = anyio.Event()

    @app.consumer(queue, timeout=30.0, retry=sc.Retry(delays=()))
    async def handle(msg: sc.Message) -> None:
        running.set()
        await anyio.sleep(DEADLINE)

    cancelled_at = math.inf
    with anyio.move_on_after(DEADLINE) as outer:
        async with app.running():
            await oracle.publish(queue, b"in flight")
            await running.wait()
            cancelled_at = anyio.current_time()
            outer.cancel()
            await anyio.sleep_forever()
    took = anyio.current_time() - cancelled_at

    assert took < 2.0, f"leaving took {took:.1f} s after the outer cancellation"
    await wait_for_count(oracle, queue, 1)  # the broker requeued it with the connection
