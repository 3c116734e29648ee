"""The anyio I/O layer against a scripted fake broker over in-memory streams.

Each test runs the real client (``connect_stream``) against a script of the broker's
side (see ``fake_broker.py``): the script asserts every frame the client sends, the
test asserts what the client's caller sees. Timing tests run on trio's autojump
clock and assert exact virtual times; the others run on trio and asyncio.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import pytest
import trio.testing
from pamqp import body, commands, header
from pamqp.heartbeat import Heartbeat

from strictconsume.amqp import (
    ChannelClosed,
    ConnectionClosed,
    ConnectionLost,
    ConnectionParameters,
    ConsumerCancelled,
    Delivery,
    MessageReturned,
    PublishNacked,
    QueueDeclareOk,
    RemoteProtocolError,
    connect_stream,
)

from .fake_broker import FakeBroker, pair

if TYPE_CHECKING:
    from strictconsume.amqp import Channel, Connection, Consumer

pytestmark = pytest.mark.anyio

PASSWORD = "pw-Zq8-never-shown-7731"
PARAMS = ConnectionParameters(username="alice", password=PASSWORD, vhost="shop")
URL = "amqp://alice:***@localhost:5672/shop"


def autojump() -> pytest.MarkDecorator:
    """Run the test on trio only, with a MockClock that jumps to the next deadline
    whenever every task is blocked. Times are asserted relative to the test's start."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-autojump")]
    )


def names(frames: list[object]) -> list[str]:
    """The method names (or frame kinds) of frames, for comparing traces."""
    return [getattr(f, "name", type(f).__name__) for f in frames]


def heartbeat_times(broker: FakeBroker, t0: float) -> list[float]:
    return [r.time - t0 for r in broker.received if isinstance(r.frame, Heartbeat)]


def blocked_reason(conn: Connection) -> str | None:
    """``conn.blocked``, read through a call so that mypy does not narrow it."""
    return conn.blocked


def assert_no_password(error: BaseException) -> None:
    shown = "".join(traceback.format_exception(error)) + repr(error)
    assert PASSWORD not in shown


# -- 1. handshake and clean close ------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "brokers", "negotiated"),
    [
        pytest.param(None, 60, 60, id="accept-broker"),
        pytest.param(0, 60, 0, id="disabled-by-client"),
        pytest.param(30, 60, 30, id="lower-of-both"),
        pytest.param(30, 0, 30, id="broker-proposes-none"),
    ],
)
async def test_handshake_negotiates_and_close_is_clean(
    anyio_backend: Any, ours: int | None, brokers: int, negotiated: int
) -> None:
    client, broker = pair()
    sent: list[Any] = []

    async def script() -> None:
        sent.extend(await broker.handshake(heartbeat=brokers, frame_max=8192, channel_max=100))
        await broker.close_connection()

    params = attrs.evolve(PARAMS, heartbeat=ours)
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, params) as conn:
            assert conn.is_open
            assert (conn.heartbeat, conn.frame_max, conn.channel_max) == (negotiated, 8192, 100)
            assert conn.server_properties["product"] == "FakeMQ"
            assert repr(conn) == f"<strictconsume.amqp.Connection {URL} open>"
        assert not conn.is_open
    start_ok, tune_ok, open_ = sent
    assert start_ok.mechanism == "PLAIN"
    assert start_ok.response == f"\0alice\0{PASSWORD}"
    capabilities = start_ok.client_properties["capabilities"]
    for capability in (
        "publisher_confirms",
        "consumer_cancel_notify",
        "basic.nack",
        "connection.blocked",
        "authentication_failure_close",
    ):
        assert capabilities[capability] is True
    assert (tune_ok.channel_max, tune_ok.frame_max, tune_ok.heartbeat) == (100, 8192, negotiated)
    assert open_.virtual_host == "shop"


async def test_body_error_closes_cleanly_and_propagates_unwrapped(anyio_backend: Any) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.close_connection()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ValueError, match=r"^from the body$"):
            async with connect_stream(client, PARAMS):
                raise ValueError("from the body")


# -- 2. heartbeats -----------------------------------------------------------------------


@autojump()
@pytest.mark.parametrize(
    ("broker_heartbeat_at", "client_heartbeats", "dead_at"),
    [
        pytest.param(None, [5, 10, 15], 20, id="silent"),
        pytest.param(7, [5, 10, 15, 20, 25], 27, id="one-heartbeat-at-7"),
    ],
)
async def test_silent_broker_fails_connection_after_two_intervals(
    anyio_backend: Any,
    broker_heartbeat_at: float | None,
    client_heartbeats: list[float],
    dead_at: float,
) -> None:
    client, broker = pair()
    t0 = anyio.current_time()

    async def script() -> None:
        await broker.handshake(heartbeat=10)
        async with anyio.create_task_group() as beats:
            if broker_heartbeat_at is not None:
                beats.start_soon(send_heartbeat_at, t0 + broker_heartbeat_at)
            assert names(await broker.expect_eof()) == ["Heartbeat"] * len(client_heartbeats)

    async def send_heartbeat_at(deadline: float) -> None:
        await anyio.sleep_until(deadline)
        await broker.send(0, Heartbeat())

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionLost) as exc_info:
            async with connect_stream(client, PARAMS) as conn:
                await anyio.sleep_forever()
        assert anyio.current_time() - t0 == dead_at
    assert conn.heartbeat == 10
    assert type(exc_info.value) is ConnectionLost
    assert str(exc_info.value) == (
        f"the broker at {URL} sent nothing for 20 s (two heartbeat intervals of 10 s); "
        "the broker or the network is down or frozen"
    )
    assert heartbeat_times(broker, t0) == client_heartbeats


def block_the_loop(seconds: float) -> None:
    """What a handler calling time.sleep does, on the virtual clock: time passes and
    no task runs."""
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    clock.jump(seconds)


@autojump()
async def test_a_blocked_event_loop_is_named_when_the_broker_then_drops_us(
    anyio_backend: Any,
) -> None:
    """The broker closes the socket of a client whose event loop was blocked past two
    heartbeat intervals: the error says the process was blocked (what to fix), not
    that the broker went silent."""
    client, broker = pair()

    async def script() -> None:
        await broker.handshake(heartbeat=10)
        await blocked.wait()
        await broker.send_eof()

    async def block_then_wait(client: Any) -> None:
        async with connect_stream(client, PARAMS):
            await anyio.sleep(3)
            block_the_loop(30)
            blocked.set()
            await anyio.sleep_forever()

    blocked = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionLost) as exc_info:
            await block_then_wait(client)
    message = str(exc_info.value)
    assert "event loop was blocked for 2" in message, message
    assert "a handler is running blocking code" in message
    assert isinstance(exc_info.value.__cause__, ConnectionLost)


@autojump()
async def test_after_a_blocked_loop_what_waits_in_the_socket_is_read_before_any_verdict(
    anyio_backend: Any,
) -> None:
    """A heartbeat the broker sent while the client's loop was blocked is read before
    the client judges the broker silent: the connection lives on."""
    client, broker = pair()

    async def script() -> None:
        await broker.handshake(heartbeat=10)
        await blocked.wait()
        # Sent "during" the block: it is runnable in the same scheduler round as the
        # client's overdue heartbeat task, in an order trio chooses.
        await broker.send(0, Heartbeat())
        await anyio.sleep_forever()

    blocked = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn:
            await anyio.sleep(1)
            block_the_loop(25)
            blocked.set()
            await anyio.sleep(2)
            assert conn.is_open
        tg.cancel_scope.cancel()


@autojump()
async def test_heartbeat_only_after_half_an_interval_without_sending(anyio_backend: Any) -> None:
    client, broker = pair()
    t0 = anyio.current_time()

    async def script() -> None:
        await broker.handshake(heartbeat=10)
        await broker.open_channel(1)
        method, data = await broker.expect_publish(1)
        assert (method.routing_key, data) == ("orders", b"hi")
        assert broker.received[-1].time - t0 == 3
        assert names(await broker.expect_eof()) == ["Heartbeat"] * 3

    async def client_side() -> None:
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            await anyio.sleep(3)
            await ch.publish(b"hi", routing_key="orders")
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionLost, match="two heartbeat intervals"):
            await client_side()
        assert anyio.current_time() - t0 == 20
    # The publish at 3 s postponed the first heartbeat from 5 s to 8 s.
    assert heartbeat_times(broker, t0) == [8, 13, 18]


@autojump()
async def test_broker_heartbeats_keep_the_connection_alive(anyio_backend: Any) -> None:
    client, broker = pair()
    t0 = anyio.current_time()

    async def script() -> None:
        await broker.handshake(heartbeat=10)
        async with anyio.create_task_group() as tg:

            async def beat() -> None:
                while True:
                    await anyio.sleep(10)
                    await broker.send(0, Heartbeat())

            tg.start_soon(beat)
            while not isinstance((await broker.receive_frame()).frame, commands.Connection.Close):
                pass
            tg.cancel_scope.cancel()
        await broker.send(0, commands.Connection.CloseOk())
        # The heartbeat due at 300 s may go out after connection.close.
        assert set(names(await broker.expect_eof())) <= {"Heartbeat"}

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn:
            await anyio.sleep(300)
            assert conn.is_open
        assert anyio.current_time() - t0 == 300
    beats = [t for t in heartbeat_times(broker, t0) if t < 300]
    assert beats == [5.0 * k for k in range(1, 60)]


# -- 3. disconnect in the middle of a frame ----------------------------------------------


@pytest.mark.parametrize("cut_in", ["method-frame", "body-frame"])
async def test_disconnect_mid_frame_fails_consumer_waiter_and_connection(
    anyio_backend: Any, cut_in: str
) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        consume = await broker.expect(commands.Basic.Consume, 1)
        await broker.send(1, commands.Basic.ConsumeOk(consume.consumer_tag))
        await broker.expect(commands.Queue.Declare, 1)
        tag = consume.consumer_tag or ""
        frames = broker.deliver_bytes(1, tag, 1, b"x" * 100)
        method = FakeBroker.frame(1, commands.Basic.Deliver(tag, 1, False, "", "q"))
        cut = {
            "method-frame": len(method) // 2,
            # The method and the content header whole, then half of the body frame.
            "body-frame": len(frames) - (100 + 8) // 2,
        }[cut_in]
        await broker.send_raw(frames[:cut])
        await broker.send_eof()
        assert await broker.expect_eof() == []

    errors: dict[str, BaseException] = {}
    delivered: list[Delivery] = []

    # Shielded (but bounded), so that these see what their waiter got rather than the
    # cancellation of the connection's body: a waiter left pending would time out.
    async def iterate(consumer: Consumer) -> None:
        with anyio.fail_after(5, shield=True):
            try:
                async for delivery in consumer:
                    delivered.append(delivery)
            except ConnectionLost as exc:
                errors["consumer"] = exc

    async def declare(ch: Channel) -> None:
        with anyio.fail_after(5, shield=True):
            try:
                await ch.queue_declare("audit")
            except ConnectionLost as exc:
                errors["declare"] = exc

    async def client_side() -> None:
        async with (
            connect_stream(client, PARAMS) as conn,
            conn.channel() as ch,
            ch.consume("orders") as consumer,
            anyio.create_task_group() as body_tg,
        ):
            connections.append(conn)
            body_tg.start_soon(iterate, consumer)
            body_tg.start_soon(declare, ch)

    connections: list[Connection] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionLost) as exc_info:
            await client_side()
    error = exc_info.value
    assert str(error) == f"the broker at {URL} closed the connection while reading"
    assert errors == {"consumer": error, "declare": error}
    assert delivered == []
    assert not connections[0].is_open


@pytest.mark.parametrize("consumer_iterating", [False, True], ids=["idle", "consumer-iterating"])
async def test_connection_lost_keeps_its_cause(
    anyio_backend: Any, consumer_iterating: bool
) -> None:
    """The error says where it came from (``raise ... from exc`` at the transport
    boundary), also after a consumer re-raised it to its iterator."""
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        consume = await broker.expect(commands.Basic.Consume, 1)
        tag = consume.consumer_tag or ""
        await broker.send(1, commands.Basic.ConsumeOk(tag))
        await broker.deliver(1, tag, 1, b"one")
        await broker.expect(commands.Basic.Ack, 1)  # the consumer iterates (or the body acked)
        await broker.send_eof()
        assert await broker.expect_eof() == []

    iterator_got: list[BaseException] = []

    async def iterate(ch: Channel, consumer: Consumer) -> None:
        with anyio.fail_after(5, shield=True):
            try:
                async for delivery in consumer:
                    await ch.ack(delivery.delivery_tag)
            except ConnectionLost as exc:
                iterator_got.append(exc)

    async def client_side() -> None:
        async with (
            connect_stream(client, PARAMS) as conn,
            conn.channel() as ch,
            ch.consume("orders") as consumer,
            anyio.create_task_group() as body_tg,
        ):
            if consumer_iterating:
                body_tg.start_soon(iterate, ch, consumer)
            else:
                await ch.ack((await anext(consumer)).delivery_tag)
                await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionLost) as exc_info:
            await client_side()
    assert iterator_got == ([exc_info.value] if consumer_iterating else [])
    assert isinstance(exc_info.value.__cause__, anyio.EndOfStream)


@pytest.mark.parametrize("waiting_in", ["consumer", "queue_declare"])
async def test_connection_lost_is_not_wrapped_by_the_bodys_task_group(
    anyio_backend: Any, waiting_in: str
) -> None:
    """The usual shape of a consumer program: tasks in the body's own task group wait
    on the connection. When it breaks, ``async with`` raises the connection's error
    itself, not an exception group of it and of cancellations."""
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        consume = await broker.expect(commands.Basic.Consume, 1)
        tag = consume.consumer_tag or ""
        await broker.send(1, commands.Basic.ConsumeOk(tag))
        if waiting_in == "consumer":
            await broker.deliver(1, tag, 1, b"one")
            await broker.expect(commands.Basic.Ack, 1)
        else:
            await broker.expect(commands.Queue.Declare, 1)
        await broker.send_eof()
        assert await broker.expect_eof() == []

    async def iterate(ch: Channel, consumer: Consumer) -> None:
        async for delivery in consumer:
            await ch.ack(delivery.delivery_tag)

    async def client_side() -> None:
        async with (
            connect_stream(client, PARAMS) as conn,
            conn.channel() as ch,
            ch.consume("orders") as consumer,
            anyio.create_task_group() as body_tg,
        ):
            if waiting_in == "consumer":
                body_tg.start_soon(iterate, ch, consumer)
            else:
                body_tg.start_soon(ch.queue_declare, "audit")

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(BaseException) as exc_info:  # noqa: PT011 - the type is the point
            await client_side()
    assert type(exc_info.value) is ConnectionLost, repr(exc_info.value)
    assert str(exc_info.value) == f"the broker at {URL} closed the connection while reading"


async def test_write_failure_is_connection_lost(anyio_backend: Any) -> None:
    client, broker = pair()
    client_done = anyio.Event()

    async def script() -> None:
        await broker.handshake()
        await broker.expect(commands.Channel.Open, 1)
        await broker.stop_reading()
        await broker.send(1, commands.Channel.OpenOk())
        await client_done.wait()  # the broker's sending side stays open

    async def client_side() -> None:
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            await ch.publish(b"x", routing_key="orders")  # queued; the writer fails
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionLost) as exc_info:
            await client_side()
        client_done.set()
    assert (
        str(exc_info.value) == f"the connection to {URL} broke while writing: BrokenResourceError"
    )
    assert isinstance(exc_info.value.__cause__, anyio.BrokenResourceError)


# -- 4. and 5. bytes that are not AMQP ---------------------------------------------------


async def test_garbage_after_handshake_is_remote_protocol_error(anyio_backend: Any) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.send_raw(b"garbage, not AMQP at all")
        assert await broker.expect_eof() == []  # no connection.close to a broken peer

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(RemoteProtocolError) as exc_info:
            async with connect_stream(client, PARAMS):
                await anyio.sleep_forever()
    assert type(exc_info.value) is RemoteProtocolError
    assert "unknown type 103" in str(exc_info.value)  # b"g"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        pytest.param(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            "the peer does not speak AMQP 0-9-1: it sent b'HTTP/1.1 400 Bad Request",
            id="http",
        ),
        pytest.param(
            b"AMQP\x00\x01\x00\x00",
            "the broker does not support AMQP 0-9-1: it offered protocol version 1-0-0",
            id="amqp-1.0-header",
        ),
    ],
)
async def test_peer_that_does_not_speak_amqp_091_fails_promptly(
    anyio_backend: Any, reply: bytes, message: str
) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.receive_protocol_header()
        await broker.send_raw(reply)  # and keep the connection open
        assert await broker.expect_eof() == []

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        # Well before connection_timeout: the first bytes alone tell.
        with anyio.fail_after(2), pytest.raises(RemoteProtocolError) as exc_info:
            async with connect_stream(client, attrs.evolve(PARAMS, connection_timeout=60)):
                pytest.fail("the body must not run")
    assert message in str(exc_info.value)


# -- 6. the broker refuses the connection during the handshake ---------------------------


async def test_eof_after_start_ok_is_connection_lost_in_handshake(anyio_backend: Any) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.start()
        await broker.send_eof()
        assert await broker.expect_eof() == []

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionLost) as exc_info:
            async with connect_stream(client, PARAMS):
                pytest.fail("the body must not run")
    error = exc_info.value
    assert str(error).startswith(
        f"the broker at {URL} closed the connection during the handshake (state AWAIT_TUNE)"
    )
    assert "wrong credentials" in str(error)
    assert isinstance(error.__cause__, ConnectionLost)
    assert_no_password(error)


async def test_access_refused_after_start_ok(anyio_backend: Any) -> None:
    client, broker = pair()
    after_close: list[object] = []

    async def script() -> None:
        await broker.start()
        await broker.send(
            0,
            commands.Connection.Close(
                403,
                "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
                "For details see the broker logfile.",
                0,
                0,
            ),
        )
        after_close.extend(await broker.expect_eof())

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionClosed) as exc_info:
            async with connect_stream(client, PARAMS):
                pytest.fail("the body must not run")
    error = exc_info.value
    assert (error.reply_code, error.reply_name) == (403, "ACCESS_REFUSED")
    assert "ACCESS_REFUSED - Login was refused" in str(error)
    assert f"logging in as 'alice' to vhost 'shop' at {URL}" in str(error)
    assert "check the user name and password" in str(error)
    assert_no_password(error)
    assert names(after_close) == ["Connection.CloseOk"]


async def test_not_allowed_after_open_names_the_vhost(anyio_backend: Any) -> None:
    client, broker = pair()
    after_close: list[object] = []

    async def script() -> None:
        await broker.start()
        await broker.send(0, commands.Connection.Tune(2047, 131072, 0))
        await broker.expect(commands.Connection.TuneOk, 0)
        open_ = await broker.expect(commands.Connection.Open, 0)
        assert open_.virtual_host == "shop"
        await broker.send(
            0, commands.Connection.Close(530, "NOT_ALLOWED - vhost shop not found", 10, 40)
        )
        after_close.extend(await broker.expect_eof())

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionClosed) as exc_info:
            async with connect_stream(client, PARAMS):
                pytest.fail("the body must not run")
    error = exc_info.value
    assert (error.reply_code, error.class_id, error.method_id) == (530, 10, 40)
    assert "NOT_ALLOWED - vhost shop not found" in str(error)
    assert "vhost 'shop'" in str(error)
    assert "check that the vhost exists" in str(error)
    assert_no_password(error)
    assert names(after_close) == ["Connection.CloseOk"]


# -- 7. handshake timeout -------------------------------------------------------------------


@autojump()
@pytest.mark.parametrize("stall", ["before-start", "before-tune", "before-open-ok"])
async def test_handshake_times_out_after_connection_timeout(anyio_backend: Any, stall: str) -> None:
    client, broker = pair()
    t0 = anyio.current_time()

    async def script() -> None:
        if stall == "before-start":
            await broker.receive_protocol_header()
        elif stall == "before-tune":
            await broker.start()
        else:
            await broker.start()
            await broker.send(0, commands.Connection.Tune(2047, 131072, 0))
            await broker.expect(commands.Connection.TuneOk, 0)
            await broker.expect(commands.Connection.Open, 0)
        assert await broker.expect_eof() == []
        assert anyio.current_time() - t0 == 7.5

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionLost) as exc_info:
            async with connect_stream(client, attrs.evolve(PARAMS, connection_timeout=7.5)):
                pytest.fail("the body must not run")
        assert anyio.current_time() - t0 == 7.5
    assert str(exc_info.value) == (
        f"the broker at {URL} did not complete the AMQP handshake within 7.5 s"
    )


# -- 8. a channel error closes only its channel ----------------------------------------------

PRECONDITION_FAILED = (
    "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'orders' in vhost 'shop': "
    "received 'false' but current is 'true'"
)


async def test_channel_close_from_broker_closes_only_that_channel(anyio_backend: Any) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await broker.open_channel(2)
        declare = await broker.expect(commands.Queue.Declare, 1)
        assert declare.queue == "orders"
        await broker.send(1, commands.Channel.Close(406, PRECONDITION_FAILED, 50, 10))
        await broker.expect(commands.Channel.CloseOk, 1)
        declare = await broker.expect(commands.Queue.Declare, 2)
        assert declare.queue == "audit"
        await broker.send(2, commands.Queue.DeclareOk("audit", 3, 1))
        await broker.close_channel(2)
        await broker.close_connection()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn:
            async with conn.channel() as ch1, conn.channel() as ch2:
                assert (ch1.channel_id, ch2.channel_id) == (1, 2)
                with pytest.raises(ChannelClosed) as exc_info:
                    await ch1.queue_declare("orders")
                error = exc_info.value
                assert (error.reply_code, error.class_id, error.method_id) == (406, 50, 10)
                assert error.channel_id == 1
                assert str(error).startswith(
                    f"the broker closed channel 1: 406 {PRECONDITION_FAILED}"
                )
                with pytest.raises(ChannelClosed) as again:
                    await ch1.queue_purge("orders")  # refused locally, nothing is sent
                assert again.value.reply_code == 406
                assert not ch1.is_open
                assert ch2.is_open
                assert await ch2.queue_declare("audit") == QueueDeclareOk("audit", 3, 1)
            assert conn.is_open


# -- bounded waits for the broker --------------------------------------------------------


@autojump()
async def test_unanswered_channel_close_gives_up_after_close_timeout(anyio_backend: Any) -> None:
    client, broker = pair()
    t0 = anyio.current_time()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await broker.expect(commands.Channel.Close, 1)  # never answered
        await broker.close_connection()
        connection_close = broker.received[-1]
        assert names([connection_close.frame]) == ["Connection.Close"]
        assert connection_close.time - t0 == 5

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn:
            async with conn.channel() as ch:
                pass
            assert anyio.current_time() - t0 == 5
            assert not ch.is_open
            assert conn.is_open


@autojump()
async def test_unanswered_connection_close_gives_up_after_close_timeout(anyio_backend: Any) -> None:
    client, broker = pair()
    t0 = anyio.current_time()

    async def script() -> None:
        await broker.handshake()
        await broker.expect(commands.Connection.Close, 0)  # never answered
        assert await broker.expect_eof() == []
        assert anyio.current_time() - t0 == 5

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS):
            pass
        assert anyio.current_time() - t0 == 5


@autojump()
async def test_unanswered_basic_cancel_still_requeues_after_timeout(anyio_backend: Any) -> None:
    client, broker = pair()
    t0 = anyio.current_time()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        consume = await broker.expect(commands.Basic.Consume, 1)
        tag = consume.consumer_tag or ""
        await broker.send(1, commands.Basic.ConsumeOk(tag))
        await broker.send_raw(
            broker.deliver_bytes(1, tag, 1, b"m1") + broker.deliver_bytes(1, tag, 2, b"m2")
        )
        await broker.expect(commands.Basic.Cancel, 1)  # never answered
        nack = await broker.expect(commands.Basic.Nack, 1)
        assert (nack.delivery_tag, nack.requeue) == (2, True)
        assert broker.received[-1].time - t0 == 5
        await broker.close_channel(1)
        await broker.close_connection()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            async with ch.consume("orders") as consumer:
                async for delivery in consumer:
                    assert delivery.delivery_tag == 1
                    break
            assert anyio.current_time() - t0 == 5


@autojump()
async def test_publish_waits_while_the_socket_is_backed_up(anyio_backend: Any) -> None:
    client, broker = pair(client_buffer=0)  # the client's writes wait for the broker
    t0 = anyio.current_time()
    big = b"x" * (5 * 1024 * 1024)  # more than WRITE_HIGH_WATER (4 MiB)

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await anyio.sleep(10)  # not reading: the client's socket is full
        for routing_key in ("a", "b"):
            method, data = await broker.expect_publish(1)
            assert (method.routing_key, len(data)) == (routing_key, len(big))
        await broker.close_channel(1)
        await broker.close_connection()

    returned_at: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            for routing_key in ("a", "b"):
                await ch.publish(big, routing_key=routing_key)
                returned_at.append(anyio.current_time() - t0)
    # "a" only queued its bytes; "b" found more than WRITE_HIGH_WATER queued and
    # waited until the broker read them.
    assert returned_at == [0, 10]


# -- 9. and 10. consumers ---------------------------------------------------------------------


@pytest.mark.parametrize("nowait", [False, True], ids=["wait", "nowait"])
async def test_broker_cancel_ends_iteration_after_earlier_deliveries(
    anyio_backend: Any, nowait: bool
) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        consume = await broker.expect(commands.Basic.Consume, 1)
        tag = consume.consumer_tag or ""
        assert (consume.queue, tag, consume.no_ack) == ("orders", "sc-1-1", False)
        await broker.send(1, commands.Basic.ConsumeOk(tag))
        await broker.send_raw(
            broker.deliver_bytes(1, tag, 1, b"one")
            + broker.deliver_bytes(1, tag, 2, b"two")
            + FakeBroker.frame(1, commands.Basic.Cancel(tag, nowait=nowait))
        )
        if not nowait:
            cancel_ok = await broker.expect(commands.Basic.CancelOk, 1)
            assert cancel_ok.consumer_tag == tag
        for delivery_tag in (1, 2):
            ack = await broker.expect(commands.Basic.Ack, 1)
            assert (ack.delivery_tag, ack.multiple) == (delivery_tag, False)
        await broker.close_channel(1)  # and no basic.cancel or basic.nack before it
        await broker.close_connection()

    bodies: list[bytes] = []

    async def take_all(ch: Channel, consumer: Consumer) -> None:
        async for delivery in consumer:
            bodies.append(delivery.body)
            await ch.ack(delivery.delivery_tag)

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            async with ch.consume("orders") as consumer:
                with pytest.raises(ConsumerCancelled) as exc_info:
                    await take_all(ch, consumer)
                with pytest.raises(ConsumerCancelled):
                    await anext(consumer)  # the iterator stays ended
            assert ch.is_open
    assert bodies == [b"one", b"two"]
    error = exc_info.value
    assert (error.consumer_tag, error.queue) == ("sc-1-1", "orders")
    assert "consumer 'sc-1-1' on queue 'orders'" in str(error)
    assert "consume again" in str(error)


async def test_a_callback_consumer_takes_deliveries_as_read_and_ends_like_the_iteration(
    anyio_backend: Any,
) -> None:
    """``on_delivery`` gets each delivery from the reader; one it declines (returns
    False) is nacked with requeue when the consumer goes, like an unyielded delivery;
    ``wait()`` raises the broker's cancel, as the iteration would."""
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        consume = await broker.expect(commands.Basic.Consume, 1)
        tag = consume.consumer_tag or ""
        await broker.send(1, commands.Basic.ConsumeOk(tag))
        await broker.send_raw(
            broker.deliver_bytes(1, tag, 1, b"one")
            + broker.deliver_bytes(1, tag, 2, b"declined")
            + broker.deliver_bytes(1, tag, 3, b"three")
            + FakeBroker.frame(1, commands.Basic.Cancel(tag, nowait=True))
        )
        nack = await broker.expect(commands.Basic.Nack, 1)
        assert (nack.delivery_tag, nack.requeue) == (2, True)
        await broker.close_channel(1)
        await broker.close_connection()

    taken: list[bytes] = []

    def on_delivery(delivery: Delivery) -> bool:
        if delivery.body == b"declined":
            return False
        taken.append(delivery.body)
        return True

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with (
            connect_stream(client, PARAMS) as conn,
            conn.channel() as ch,
            ch.consume("orders", on_delivery=on_delivery) as consumer,
        ):
            with pytest.raises(ConsumerCancelled):
                await consumer.wait()
    assert taken == [b"one", b"three"]


async def test_consume_exit_cancels_and_requeues_unyielded_deliveries(anyio_backend: Any) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        consume = await broker.expect(commands.Basic.Consume, 1)
        tag = consume.consumer_tag or ""
        await broker.send(1, commands.Basic.ConsumeOk(tag))
        await broker.send_raw(
            b"".join(broker.deliver_bytes(1, tag, n, b"m%d" % n) for n in (1, 2, 3))
        )
        # The ack needs no reply: the client goes on to cancel without one.
        ack = await broker.expect(commands.Basic.Ack, 1)
        assert (ack.delivery_tag, ack.multiple) == (1, False)
        cancel = await broker.expect(commands.Basic.Cancel, 1)
        assert (cancel.consumer_tag, cancel.nowait) == (tag, False)
        # A delivery already in flight when the broker got basic.cancel.
        await broker.send_raw(broker.deliver_bytes(1, tag, 4, b"m4"))
        await broker.send(1, commands.Basic.CancelOk(tag))
        for delivery_tag in (2, 3, 4):
            nack = await broker.expect(commands.Basic.Nack, 1)
            assert (nack.delivery_tag, nack.multiple, nack.requeue) == (delivery_tag, False, True)
        await broker.close_channel(1)
        await broker.close_connection()

    yielded: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with (
            connect_stream(client, PARAMS) as conn,
            conn.channel() as ch,
            ch.consume("orders") as consumer,
        ):
            async for delivery in consumer:
                yielded.append(delivery.delivery_tag)
                await ch.ack(delivery.delivery_tag)
                break
    assert yielded == [1]


# -- 11. publisher confirms -------------------------------------------------------------------


async def test_confirmed_publishes_get_their_own_outcome(anyio_backend: Any) -> None:
    client, broker = pair()
    next_tag = 1

    async def receive_publishes(count: int) -> dict[str, int]:
        """Read ``count`` publishes; their publish tags by routing key."""
        nonlocal next_tag
        tags = {}
        for _ in range(count):
            method, data = await broker.expect_publish(1)
            assert data == (method.routing_key or "").encode()
            tags[method.routing_key or ""] = next_tag
            next_tag += 1
        return tags

    def returned(routing_key: str) -> bytes:
        return (
            FakeBroker.frame(1, commands.Basic.Return(312, "NO_ROUTE", "shop", routing_key))
            + FakeBroker.frame(1, header.ContentHeader(0, len(routing_key)))
            + FakeBroker.frame(1, body.ContentBody(routing_key.encode()))
        )

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await broker.expect(commands.Confirm.Select, 1)
        await broker.send(1, commands.Confirm.SelectOk())
        assert await receive_publishes(1) == {"single": 1}
        await broker.send(1, commands.Basic.Ack(1))
        assert sorted((await receive_publishes(3)).values()) == [2, 3, 4]
        await broker.send(1, commands.Basic.Ack(4, multiple=True))
        assert await receive_publishes(1) == {"nacked": 5}
        await broker.send(1, commands.Basic.Nack(5))
        assert await receive_publishes(1) == {"unroutable": 6}
        await broker.send_raw(returned("unroutable") + FakeBroker.frame(1, commands.Basic.Ack(6)))
        tags = await receive_publishes(4)
        await broker.send_raw(
            returned("c-returned")
            + FakeBroker.frame(1, commands.Basic.Nack(tags["c-nacked"]))
            + FakeBroker.frame(1, commands.Basic.Ack(max(tags.values()), multiple=True))
        )
        await broker.close_channel(1)
        await broker.close_connection()

    outcomes: dict[str, object] = {}

    async def publish(ch: Channel, routing_key: str, mandatory: bool = False) -> None:
        try:
            await ch.publish(
                routing_key.encode(), exchange="shop", routing_key=routing_key, mandatory=mandatory
            )
        except (PublishNacked, MessageReturned) as exc:
            outcomes[routing_key] = exc
        else:
            outcomes[routing_key] = "confirmed"

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn, conn.channel(confirms=True) as ch:
            assert ch.confirms
            await ch.publish(b"single", exchange="shop", routing_key="single")
            async with anyio.create_task_group() as publishers:
                for key in ("m1", "m2", "m3"):
                    publishers.start_soon(publish, ch, key)
            assert outcomes == dict.fromkeys(("m1", "m2", "m3"), "confirmed")
            with pytest.raises(PublishNacked) as nacked:
                await ch.publish(b"nacked", exchange="shop", routing_key="nacked")
            assert (nacked.value.exchange, nacked.value.routing_key) == ("shop", "nacked")
            with pytest.raises(MessageReturned) as was_returned:
                await ch.publish(
                    b"unroutable", exchange="shop", routing_key="unroutable", mandatory=True
                )
            error = was_returned.value
            assert (error.reply_code, error.reply_text) == (312, "NO_ROUTE")
            assert (error.exchange, error.routing_key) == ("shop", "unroutable")
            outcomes.clear()
            async with anyio.create_task_group() as publishers:
                publishers.start_soon(publish, ch, "c-confirmed")
                publishers.start_soon(publish, ch, "c-nacked")
                publishers.start_soon(publish, ch, "c-returned", True)
                publishers.start_soon(publish, ch, "c-confirmed-too", True)
    assert outcomes["c-confirmed"] == "confirmed"
    assert outcomes["c-confirmed-too"] == "confirmed"
    assert isinstance(outcomes["c-nacked"], PublishNacked)
    assert isinstance(outcomes["c-returned"], MessageReturned)
    assert outcomes["c-returned"].routing_key == "c-returned"


# -- 12. connection.blocked ---------------------------------------------------------------------


async def test_blocked_and_unblocked(anyio_backend: Any) -> None:
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.expect(commands.Channel.Open, 1)
        await broker.send_raw(
            FakeBroker.frame(0, commands.Connection.Blocked("low on memory"))
            + FakeBroker.frame(1, commands.Channel.OpenOk())
        )
        await broker.expect(commands.Queue.Declare, 1)
        await broker.send_raw(
            FakeBroker.frame(0, commands.Connection.Unblocked())
            + FakeBroker.frame(1, commands.Queue.DeclareOk("orders", 0, 0))
        )
        await broker.close_channel(1)
        await broker.close_connection()

    seen_after_wait: list[str | None] = []

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn:
            assert blocked_reason(conn) is None
            with anyio.fail_after(1):
                await conn.wait_unblocked()  # not blocked: returns at once
            async with conn.channel() as ch:
                assert blocked_reason(conn) == "low on memory"
                with anyio.move_on_after(0.05) as scope:
                    await conn.wait_unblocked()
                assert scope.cancelled_caught

                async def wait() -> None:
                    await conn.wait_unblocked()
                    seen_after_wait.append(conn.blocked)

                with anyio.fail_after(2):
                    async with anyio.create_task_group() as waiters:
                        waiters.start_soon(wait)
                        await ch.queue_declare("orders")
                        assert blocked_reason(conn) is None
    assert seen_after_wait == [None]


# -- 13. the broker closes the connection --------------------------------------------------------


async def test_connection_forced_while_body_waits(anyio_backend: Any) -> None:
    client, broker = pair()
    after_close: list[object] = []

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await broker.send(
            0,
            commands.Connection.Close(
                320,
                "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
                0,
                0,
            ),
        )
        after_close.extend(await broker.expect_eof())

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionClosed) as exc_info:
            async with connect_stream(client, PARAMS) as conn, conn.channel():
                await anyio.sleep_forever()
    error = exc_info.value
    assert type(error) is ConnectionClosed
    assert (error.reply_code, error.reply_name) == (320, "CONNECTION_FORCED")
    assert str(error) == (
        "the broker closed the connection: 320 CONNECTION_FORCED - broker forced connection "
        f"closure with reason 'shutdown' (connection to {URL}); the broker or an operator "
        "closed the connection; reconnect"
    )
    assert not conn.is_open
    assert names(after_close) == ["Connection.CloseOk"]


# -- 14. cancelling a caller does not desynchronize the channel -----------------------------------


async def test_cancelled_call_does_not_take_the_next_reply(anyio_backend: Any) -> None:
    client, broker = pair()
    broker_has_first = anyio.Event()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        first = await broker.expect(commands.Queue.Declare, 1)
        assert first.queue == "first"
        broker_has_first.set()
        second = await broker.expect(commands.Queue.Declare, 1)
        assert second.queue == "second"
        await broker.send(1, commands.Queue.DeclareOk("first", 1, 0))
        await broker.send(1, commands.Queue.DeclareOk("second", 2, 0))
        await broker.expect(commands.Queue.Declare, 1)
        await broker.send(1, commands.Queue.DeclareOk("third", 3, 0))
        await broker.close_channel(1)
        await broker.close_connection()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            async with anyio.create_task_group() as canceller:
                scope = anyio.CancelScope()

                async def cancel_once_sent() -> None:
                    await broker_has_first.wait()
                    scope.cancel()

                canceller.start_soon(cancel_once_sent)
                with scope:
                    await ch.queue_declare("first")
                assert scope.cancelled_caught
            assert await ch.queue_declare("second") == QueueDeclareOk("second", 2, 0)
            assert await ch.queue_declare("third") == QueueDeclareOk("third", 3, 0)


# -- regressions found in review -----------------------------------------------------------


async def test_consume_cancelled_before_consume_ok_is_cancelled_at_the_broker(
    anyio_backend: Any,
) -> None:
    """A caller that gives up while basic.consume-ok is in flight must not leave a live
    consumer on the broker: the client cancels it and requeues what it delivered."""
    client, broker = pair()
    giving_up = anyio.CancelScope()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        consume = await broker.expect(commands.Basic.Consume, 1)
        tag = consume.consumer_tag or ""
        giving_up.cancel()  # the caller gives up before consume-ok
        cancel = await broker.expect(commands.Basic.Cancel, 1)
        assert (cancel.consumer_tag, cancel.nowait) == (tag, False)
        # The broker's answers were already on their way: consume-ok, a delivery,
        # then cancel-ok.
        await broker.send(1, commands.Basic.ConsumeOk(tag))
        await broker.send_raw(broker.deliver_bytes(1, tag, 1, b"m1"))
        await broker.send(1, commands.Basic.CancelOk(tag))
        nack = await broker.expect(commands.Basic.Nack, 1)
        assert (nack.delivery_tag, nack.multiple, nack.requeue) == (1, False, True)
        await broker.close_channel(1)
        await broker.close_connection()

    entered = False
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            with giving_up:
                async with ch.consume("orders"):
                    entered = True
            assert giving_up.cancelled_caught
            assert ch.is_open
    assert not entered


async def test_delivery_for_unknown_consumer_and_channel_close_in_one_read(
    anyio_backend: Any,
) -> None:
    """A delivery nobody listens to, followed by channel.close in the same read, closes
    that channel only; the connection goes on."""
    client, broker = pair()
    closed_ok = anyio.Event()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await broker.send_raw(
            broker.deliver_bytes(1, "nobody", 1, b"m1")
            + broker.frame(1, commands.Channel.Close(406, "PRECONDITION_FAILED - test", 60, 80))
        )
        await broker.expect(commands.Channel.CloseOk, 1)
        closed_ok.set()
        await broker.open_channel(1)  # the id is free again
        await broker.close_channel(1)
        await broker.close_connection()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn:
            async with conn.channel() as ch:
                await closed_ok.wait()
                with pytest.raises(ChannelClosed) as exc_info:
                    await ch.qos(1)
                assert exc_info.value.reply_code == 406
            async with conn.channel() as again:
                assert again.channel_id == 1
            assert conn.is_open


@autojump()
async def test_broker_close_with_a_stuck_socket_raises_connection_closed(
    anyio_backend: Any,
) -> None:
    """While the close-ok answering the broker's connection.close cannot be written
    (the socket is full), calls fail with ConnectionClosed and heartbeats stop; after
    the flush timeout the connection gives up with ConnectionClosed, not a group."""
    client, broker = pair(client_buffer=0)
    t0 = anyio.current_time()
    sent_close = anyio.Event()

    async def script() -> None:
        await broker.handshake(heartbeat=2)
        await broker.open_channel(1)
        await broker.send(0, commands.Connection.Close(320, "CONNECTION_FORCED - test", 0, 0))
        sent_close.set()
        await anyio.sleep(10)  # never reads again while the client waits

    errors: list[BaseException] = []

    async def client_side() -> None:
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            await sent_close.wait()
            await anyio.sleep(0.5)  # within the flush window
            try:
                await ch.ack(1)
            except BaseException as exc:
                errors.append(exc)
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        with pytest.raises(ConnectionClosed) as exc_info:
            await client_side()
        gave_up_at = anyio.current_time() - t0
    assert exc_info.value.reply_code == 320
    assert [type(e) for e in errors] == [ConnectionClosed]
    assert errors[0] is exc_info.value
    assert gave_up_at == pytest.approx(1.0, abs=0.01)  # CLOSE_OK_FLUSH_TIMEOUT after close


async def test_no_ack_consumer_tags_are_forgotten_once_cancelled(anyio_backend: Any) -> None:
    """A channel remembers a no-ack consumer's tag (a delivery for it that arrives
    after we stopped listening must not be nacked: it is acked already), but only
    until the cancel-ok or a broker-sent cancel: it used to keep every one, so a
    channel that consumes no-ack again and again grew without bound."""
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        for _ in range(50):
            consume = await broker.expect(commands.Basic.Consume, 1)
            assert consume.no_ack
            await broker.send(1, commands.Basic.ConsumeOk(consume.consumer_tag))
            cancel = await broker.expect(commands.Basic.Cancel, 1)
            await broker.send(1, commands.Basic.CancelOk(cancel.consumer_tag))
        consume = await broker.expect(commands.Basic.Consume, 1)
        await broker.send(
            1,
            commands.Basic.ConsumeOk(consume.consumer_tag),
            commands.Basic.Cancel(consume.consumer_tag, nowait=True),
        )
        await broker.close_channel(1)
        await broker.close_connection()

    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            for _ in range(50):
                async with ch.consume("q", no_ack=True):
                    pass
            assert ch._no_ack_tags == set()
            async with ch.consume("q", no_ack=True) as consumer:
                with pytest.raises(ConsumerCancelled):
                    await consumer.__anext__()
            assert ch._no_ack_tags == set()
