"""The anyio I/O shell around the sans-IO core: sockets, tasks, waiting.

Structure (nothing here knows AMQP's wire format; that is ``_protocol``):

- :func:`connect` opens TCP or TLS, then runs three tasks in a task group that the
  connection owns: the *reader* (bytes -> core -> events -> channels), the *writer*
  (everything the core queued -> the socket, in as few writes as possible), and the
  *heartbeat* (a heartbeat frame after half an interval without sending; the
  connection fails after two intervals without receiving).
- Callers never wait on the socket themselves: a call asks the core for a frame and
  wakes the writer. Acks therefore cost no round trip and coalesce into one write
  under load; a caller only waits when more than :data:`WRITE_HIGH_WATER` bytes are
  queued (backpressure). A caller that queued a batch (the framework's acks) may ask
  for it to be sent at once instead (:meth:`Connection._send_now`): when the writer is
  idle and the socket takes the bytes without waiting they go out from the caller's
  task, one scheduler round sooner; the writer sends whatever is left (``_direct``).
- Failure is structured: when the connection breaks (EOF, reset, garbage, heartbeat
  timeout, connection.close from the broker) every waiter fails with the error, the
  body of ``async with connect(...)`` is cancelled, and the ``async with`` raises the
  error (:class:`ConnectionLost`, :class:`ConnectionClosed` or
  :class:`RemoteProtocolError`), never an exception group.
- OS, TLS and anyio errors are translated to :class:`ConnectionLost` in one place
  (:func:`_transport_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import attrs

from ._channel import CLOSE_TIMEOUT, WRITE_HIGH_WATER, Channel
from ._direct import DirectSend, direct_sender, loop_clock
from ._errors import (
    AMQPError,
    ConnectionClosed,
    ConnectionLost,
    LocalProtocolError,
    ReplyTimeout,
)
from ._link import ConnectionLink
from ._protocol import (
    ChannelCloseCompleted,
    ChannelClosedByBroker,
    ChannelFlow,
    ChannelOpened,
    ConnectionBlocked,
    ConnectionCloseCompleted,
    ConnectionClosedByBroker,
    ConnectionOpened,
    ConnectionState,
    ConnectionUnblocked,
    ConsumerCancelledByBroker,
    Credentials,
    Delivery,
    Event,
    GetResult,
    HeartbeatReceived,
    MethodReceived,
    ProtocolConnection,
    PublishConfirmed,
    Returned,
    server_version,
)
from ._url import ConnectionParameters, parse_url
from ._waiter import Flag, Waiter

__all__ = ["Connection", "asyncio_cancel_requested", "connect", "connect_stream"]

logger = logging.getLogger("strictconsume.amqp")

#: How many bytes the reader asks the socket for at once.
READ_SIZE = 256 * 1024
#: How long the close-ok answering a broker's connection.close may take to be written.
CLOSE_OK_FLUSH_TIMEOUT = 1.0


@contextlib.contextmanager
def _transport_errors(params: ConnectionParameters, doing: str) -> Iterator[None]:
    """Translate OS, TLS and anyio stream errors into :class:`ConnectionLost`."""
    try:
        yield
    except (anyio.EndOfStream, anyio.IncompleteRead) as exc:
        raise ConnectionLost(f"the broker at {params.url} closed the connection {doing}") from exc
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError) as exc:
        cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
        raise ConnectionLost(
            f"the connection to {params.url} broke {doing}: {cause or type(exc).__name__}"
        ) from exc


class Connection:
    """An open AMQP connection; get one with :func:`connect`.

    Attributes:
        params: Where it is connected (the password never shows in its repr).
        server_properties: What the broker said about itself in connection.start.
    """

    def __init__(self, params: ConnectionParameters) -> None:
        self.params = params
        self._core = ProtocolConnection(
            credentials=Credentials(params.username, params.password),
            vhost=params.vhost,
            auth_mechanism=params.auth_mechanism,
            channel_max=params.channel_max,
            frame_max=params.frame_max,
            heartbeat=params.heartbeat,
        )
        self._stream: anyio.abc.ByteStream | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._channels: dict[int, Channel] = {}
        self._error: AMQPError | None = None
        self._opened: Waiter[None] = Waiter()
        self._closed: Waiter[None] = Waiter()
        self._write_wanted = Flag()
        self._drained = Flag()
        self._last_sent = 0.0
        self._last_received = 0.0
        #: (when, for how long) the heartbeat task last found the event loop had not
        #: run it for more than half an interval: something blocked this process.
        self._loop_blocked: tuple[float, float] | None = None
        self._blocked_reason: str | None = None
        self._unblocked = Flag(set=True)
        self._closed_by_broker: ConnectionClosed | None = None
        self._close_ok_flush_tried = False
        self._writing = False
        #: Bytes taken from the core that a direct send did not get out: the writer
        #: sends them before anything else.
        self._unsent = b""
        self._direct: DirectSend | None = None  # set once the stream is known
        self._clock: Callable[[], float] = anyio.current_time  # the loop's, once running
        # Set when the reader or the writer has ended (an outer cancellation ends them
        # without failing the connection): no reply can come, so closing waits for none.
        self._io_stopped = False
        self.server_properties: dict[str, object] = {}
        # What each channel may use of this connection.
        self._link = ConnectionLink(
            core=self._core,
            url=params.url,
            error=lambda: self._error,
            check_open=self._check_open,
            wake_writer=self._wake_writer,
            send_now=self._send_now,
            wait_writable=self._wait_writable,
        )

    def __repr__(self) -> str:
        state = "failed" if self._error is not None else self._core.state.name.lower()
        return f"<strictconsume.amqp.Connection {self.params.url} {state}>"

    # -- public ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True while the connection can be used."""
        return (
            self._error is None
            and not self._io_stopped
            and self._core.state is ConnectionState.OPEN
        )

    @property
    def blocked(self) -> str | None:
        """The broker's reason while it blocks publishing (connection.blocked), else None.

        RabbitMQ blocks connections that publish when a memory or disk alarm is in
        force; publishes then wait (their confirms do not arrive) until it lifts.
        """
        return self._blocked_reason

    async def wait_unblocked(self) -> None:
        """Return once the broker does not block this connection (at once if it does not)."""
        await self._unblocked.wait()

    @property
    def heartbeat(self) -> int:
        """The negotiated heartbeat interval in seconds (0: none)."""
        return self._core.heartbeat

    @property
    def server_version(self) -> tuple[int, int, int] | None:
        """The broker's version from connection.start, e.g. ``(4, 3, 6)``; None when
        it does not say. Brokers of different versions differ in ways a consumer
        meets (quorum delivery counts, consumer timeouts, limits)."""
        return server_version(self.server_properties)

    @property
    def frame_max(self) -> int:
        """The negotiated largest frame size in bytes."""
        return self._core.frame_max

    @property
    def channel_max(self) -> int:
        """The negotiated highest channel number."""
        return self._core.channel_max

    @contextlib.asynccontextmanager
    async def channel(self, *, confirms: bool = False) -> AsyncIterator[Channel]:
        """Open a channel; it is closed (channel.close) when the block exits.

        Args:
            confirms: Put the channel in publisher-confirm mode: :meth:`Channel.publish`
                then returns only once the broker has taken responsibility for the
                message, and raises if it did not.

        A channel error (the broker's channel.close, for example 404 NOT_FOUND on a
        passive declare) closes that channel only: its calls raise
        :class:`ChannelClosed`, the connection and its other channels go on.
        """
        self._check_open()
        channel_id = self._core.open_channel()
        ch = Channel(self._link, channel_id)
        self._channels[channel_id] = ch
        waiter = ch._expect_open()
        self._wake_writer()
        try:
            try:
                with anyio.move_on_after(ch.call_timeout) as opening:
                    await waiter.wait()
                if opening.cancelled_caught:
                    raise ReplyTimeout(
                        f"the broker at {self.params.url} did not open channel {channel_id} "
                        f"within {ch.call_timeout:g} s"
                    )
                if confirms:
                    await ch._enable_confirms()
            except BaseException:
                await self._close_channel(ch)
                raise
            yield ch
        finally:
            await self._close_channel(ch)

    # -- internals used by Channel ----------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._core.state is not ConnectionState.OPEN:
            raise LocalProtocolError(
                f"the connection to {self.params.url} is {self._core.state.name.lower()}, not open"
            )

    def _wake_writer(self) -> None:
        self._write_wanted.set()

    def _send_now(self) -> None:
        """Send what the core queued from this task, without waiting, when the writer
        is idle; wake the writer for whatever the socket did not take (``_direct``)."""
        direct = self._direct
        if (
            direct is None
            or self._writing
            or self._unsent
            or self._io_stopped
            or self._error is not None
        ):
            self._wake_writer()
            return
        data = self._core.data_to_send()
        if not data:
            return
        try:
            sent = direct(data)
        except OSError:
            sent = 0  # the writer's send meets the same error and fails the connection
        if sent:
            self._last_sent = self._clock()
        if sent < len(data):
            self._unsent = data[sent:]
            self._wake_writer()

    async def _wait_for_writer(self, done: Callable[[], bool]) -> None:
        """Wake the writer until ``done()`` holds; checked again after each write."""
        while not done() and not self._io_stopped:
            self._drained.clear()
            self._wake_writer()
            await self._drained.wait()

    async def _wait_writable(self) -> None:
        """Wait while too many bytes are queued for the socket (backpressure)."""
        core = self._core
        await self._wait_for_writer(
            lambda: core.bytes_pending() <= WRITE_HIGH_WATER or self._error is not None
        )
        if self._error is not None:
            raise self._error

    async def _flushed(self) -> None:
        """Wait until the writer has sent everything the core queued so far."""
        core = self._core
        await self._wait_for_writer(
            lambda: not (core.bytes_pending() or self._writing or self._unsent)
        )

    async def _close_channel(self, ch: Channel) -> None:
        """Close ``ch`` with channel.close and wait for close-ok, shielded and bounded."""
        waiter = ch._start_close()
        if (
            waiter is not None
            and self._error is None
            and not self._io_stopped
            and self._core.state is ConnectionState.OPEN
        ):
            self._core.close_channel(ch.channel_id)
            self._wake_writer()
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await waiter.wait()
        elif ch._given_up is not None and self._error is None and not self._io_stopped:
            # Closed after a call went unanswered: wait for that close's close-ok, so
            # that the channel id is free again when this returns.
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await ch._given_up.wait()
        ch._fail(LocalProtocolError(f"channel {ch.channel_id} is closed"))
        if self._channels.get(ch.channel_id) is ch:
            # Closed without close-ok (timeout): frames for this id are discarded by
            # the core until its close-ok arrives, so nobody needs the object.
            del self._channels[ch.channel_id]

    # -- the tasks ----------------------------------------------------------------------

    def _fail(self, error: AMQPError, *, cancel: bool = True) -> None:
        """The connection is dead: fail every waiter and cancel the connection's scope.

        With ``cancel=False`` the tasks go on (the reader uses that to let the writer
        send a close-ok first); a later call cancels them.
        """
        if self._error is not None:
            if cancel and self._task_group is not None:
                self._task_group.cancel_scope.cancel()
            return
        error = self._blamed_on_a_blocked_loop(error)
        self._error = error
        self._opened.fail(error)
        self._closed.fail(error)
        for ch in list(self._channels.values()):
            ch._fail(error)
        self._channels.clear()
        self._drained.set()
        self._unblocked.set()
        if cancel and self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    def _blamed_on_a_blocked_loop(self, error: AMQPError) -> AMQPError:
        """``error``, reworded when the connection broke just after this process's
        event loop was blocked longer than the broker tolerates: then the broker is
        not to blame (it closed the connection for missed heartbeats), the blocking
        code is."""
        blocked = self._loop_blocked
        interval = self._core.heartbeat
        if blocked is None or not isinstance(error, ConnectionLost) or interval <= 0:
            return error
        when, blocked_for = blocked
        # A block shorter than an interval cannot have cost the broker's patience.
        if blocked_for < interval or anyio.current_time() - when > 2 * interval:
            return error
        reworded = ConnectionLost(
            f"the connection to {self.params.url} was lost ({error}) after this process's "
            f"event loop was blocked for {blocked_for:.1f} s (the broker drops a client "
            f"that stays silent for about two heartbeat intervals, {2 * interval} s): a "
            "handler is running blocking code (time.sleep, blocking I/O, heavy "
            "computation) on the event loop; await, or move it to a thread with "
            "anyio.to_thread.run_sync"
        )
        reworded.__cause__ = error
        return reworded

    async def _reader(self) -> None:
        assert self._stream is not None
        stream = self._stream
        core = self._core
        doing = "while reading"
        try:
            while True:
                if core.state is ConnectionState.CLOSED:
                    return
                with _transport_errors(self.params, doing):
                    data = await stream.receive(READ_SIZE)
                self._last_received = self._clock()
                for event in core.receive_data(data):
                    self._handle(event)
                if core.bytes_pending():
                    self._wake_writer()
                if self._closed_by_broker is not None:
                    # Let the writer send the close-ok the core queued, briefly.
                    with anyio.move_on_after(CLOSE_OK_FLUSH_TIMEOUT):
                        await self._flushed()
                    self._close_ok_flush_tried = True
                    self._fail(self._closed_by_broker)
                    return
        except ConnectionLost as exc:
            if core.state is ConnectionState.CLOSED:
                return  # the broker dropped the socket after close-ok: expected
            error = exc
            if core.state not in (ConnectionState.OPEN, ConnectionState.CLOSING):
                error = ConnectionLost(
                    f"the broker at {self.params.url} closed the connection during the "
                    f"handshake (state {core.state.name}); this happens with wrong "
                    "credentials on brokers that do not report them, or an unacceptable "
                    "frame_max/heartbeat"
                )
                error.__cause__ = exc
            self._fail(error)
        except AMQPError as exc:
            self._fail(exc)
        finally:
            self._io_ended()

    def _io_ended(self) -> None:
        """The reader or the writer has ended: no reply can arrive any more.

        After a failure or a close that changes nothing. When an enclosing scope
        cancelled them, every wait on the broker (a channel's close-ok, a consumer's
        cancel-ok, the connection's close-ok) ends at once instead of running out its
        timeout; the connection's error is left alone, so the cancellation, not an
        error, is what leaves ``connect()``.
        """
        if self._io_stopped:
            return
        self._io_stopped = True
        if self._error is not None:
            return
        error = ConnectionLost(
            f"the connection to {self.params.url} was shut down: its tasks were cancelled"
        )
        for ch in list(self._channels.values()):
            ch._fail(error)
        self._opened.fail(error)
        self._closed.fail(error)
        self._drained.set()

    def _handle(self, event: Event) -> None:
        """Route one event from the core to whoever waits for it."""
        route = _CHANNEL_EVENTS.get(type(event))
        if route is not None:
            handler, ends_channel = route
            channel_id: int = event.channel_id  # type: ignore[union-attr]
            ch = (
                self._channels.pop(channel_id, None)
                if ends_channel
                else self._channels.get(channel_id)
            )
            if ch is not None:
                handler(ch, event)
        elif isinstance(event, HeartbeatReceived):
            pass
        elif isinstance(event, ConnectionOpened):
            self.server_properties = event.server_properties
            self._opened.resolve(None)
        elif isinstance(event, ConnectionBlocked):
            logger.warning("the broker at %s blocks publishing: %s", self.params.url, event.reason)
            self._blocked_reason = event.reason or "blocked"
            self._unblocked.clear()
        elif isinstance(event, ConnectionUnblocked):
            logger.info("the broker at %s no longer blocks publishing", self.params.url)
            self._blocked_reason = None
            self._unblocked.set()
        elif isinstance(event, ConnectionCloseCompleted):
            self._closed.resolve(None)
        elif isinstance(event, ConnectionClosedByBroker):
            context = ""
            if event.reply_code in (403, 530) and not self._opened.done:
                context = (
                    f"logging in as {self.params.username!r} to vhost {self.params.vhost!r} "
                    f"at {self.params.url}"
                )
            error = ConnectionClosed(
                event.reply_code,
                event.reply_text,
                event.class_id,
                event.method_id,
                context=context or f"connection to {self.params.url}",
            )
            # Every call fails from now on; the reader lets the writer send the
            # close-ok the core queued, then cancels the connection's tasks.
            self._closed_by_broker = error
            self._fail(error, cancel=False)
        else:  # pragma: no cover - the union is exhaustive
            raise AssertionError(f"unhandled event {event!r}")

    async def _writer(self) -> None:
        assert self._stream is not None
        stream = self._stream
        core = self._core
        try:
            while True:
                await self._write_wanted.take()
                data = core.data_to_send()
                if self._unsent:  # what a direct send left: first, in order
                    data, self._unsent = self._unsent + data, b""
                self._writing = True
                while data:
                    with _transport_errors(self.params, "while writing"):
                        await stream.send(data)
                    self._last_sent = self._clock()
                    if core.bytes_pending() <= WRITE_HIGH_WATER:
                        self._drained.set()  # waiters re-check their own condition
                    data = core.data_to_send()
                self._writing = False
                self._drained.set()
        except AMQPError as exc:
            self._fail(exc)
        finally:
            self._io_ended()

    async def _heartbeat(self) -> None:
        try:
            await self._heartbeat_loop()
        except AMQPError as exc:  # a client error here fails the connection, never the group
            self._fail(exc)

    async def _heartbeat_loop(self) -> None:
        interval = self._core.heartbeat
        if interval <= 0:
            return
        send_every = interval / 2
        silent_limit = 2 * interval
        late_by = 0.0
        while True:
            now = anyio.current_time()
            dead_at = self._last_received + silent_limit
            if late_by > send_every:
                # The loop did not run this task for a while: something blocked the
                # process. What the broker sent meanwhile waits in the socket, so the
                # silence is not the broker's until the reader has had a turn.
                self._loop_blocked = (now, late_by)
                dead_at = max(dead_at, now + min(send_every, 1.0))
            late_by = 0.0
            if now >= dead_at:
                self._fail(
                    ConnectionLost(
                        f"the broker at {self.params.url} sent nothing for {silent_limit:g} s "
                        f"(two heartbeat intervals of {interval} s); the broker or the "
                        "network is down or frozen"
                    )
                )
                return
            send_at = self._last_sent + send_every
            if now >= send_at:
                if self._core.state is ConnectionState.CLOSED:
                    return  # closed (the close-ok is being flushed): nothing to keep alive
                self._core.send_heartbeat()
                self._last_sent = now
                self._wake_writer()
                send_at = now + send_every
            wake_at = min(dead_at, send_at)
            await anyio.sleep_until(wake_at)
            late_by = anyio.current_time() - wake_at

    # -- lifecycle ----------------------------------------------------------------------

    async def _handshake(self) -> bool:
        """Run the handshake; False (with ``_error`` set) when it failed."""
        self._core.initiate()
        self._last_sent = self._last_received = anyio.current_time()
        self._wake_writer()
        try:
            await self._opened.wait()
        except AMQPError:
            return False
        return True

    async def _close(self) -> None:
        """Close with connection.close and wait for close-ok (shielded, bounded)."""
        if (
            self._error is not None
            or self._io_stopped
            or self._core.state is not ConnectionState.OPEN
        ):
            return
        for ch in list(self._channels.values()):
            ch._fail(LocalProtocolError(f"channel {ch.channel_id} closed with its connection"))
        self._core.close()
        self._wake_writer()
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            with contextlib.suppress(AMQPError):
                await self._closed.wait()


#: Events for one channel: the Channel method that handles each, and whether the
#: event ends the channel (it is then forgotten before its handler runs).
_CHANNEL_EVENTS: dict[type, tuple[Callable[[Channel, Any], None], bool]] = {
    Delivery: (Channel._on_delivery, False),
    PublishConfirmed: (Channel._on_confirm, False),
    MethodReceived: (Channel._on_method, False),
    Returned: (Channel._on_return, False),
    GetResult: (Channel._on_get_result, False),
    ChannelOpened: (Channel._on_opened, False),
    ConsumerCancelledByBroker: (Channel._on_consumer_cancelled, False),
    ChannelFlow: (Channel._on_flow, False),
    ChannelCloseCompleted: (Channel._on_close_completed, True),
    ChannelClosedByBroker: (Channel._on_closed_by_broker, True),
}


@contextlib.asynccontextmanager
async def connect(
    url: str | ConnectionParameters,
    *,
    ssl_context: ssl.SSLContext | None = None,
    heartbeat: int | None = None,
    connection_timeout: float | None = None,
) -> AsyncIterator[Connection]:
    """Connect to a broker; the connection is closed cleanly when the block exits.

    Args:
        url: ``amqp://user:password@host:port/vhost?heartbeat=30`` or ``amqps://...``
            (see :func:`parse_url`), or parsed :class:`ConnectionParameters`.
        ssl_context: The TLS context for ``amqps``; by default one that verifies the
            broker against the system's CAs (or the URL's ``cafile``).
        heartbeat: Overrides the URL's heartbeat (seconds; 0 disables, None accepts
            the broker's proposal).
        connection_timeout: Overrides the URL's limit (seconds) on TCP connect, TLS
            and the AMQP handshake, each.

    Raises:
        ConnectionLost: the broker cannot be reached, or the connection broke.
        ConnectionClosed: the broker refused or closed the connection (for example
            403 ACCESS_REFUSED for a wrong password, 530 NOT_ALLOWED for an unknown
            vhost, 320 CONNECTION_FORCED when an operator closed it).
        RemoteProtocolError: the peer does not speak AMQP 0-9-1 correctly.
        ValueError: the URL is malformed.
    """
    params = parse_url(url) if isinstance(url, str) else url
    if heartbeat is not None:
        params = _evolve(params, heartbeat=heartbeat)
    if connection_timeout is not None:
        params = _evolve(params, connection_timeout=connection_timeout)
    try:
        with anyio.fail_after(params.connection_timeout):
            stream = await _open_stream(params, ssl_context)
    except TimeoutError:
        raise ConnectionLost(
            f"could not connect to {params.url} within {params.connection_timeout:g} s"
        ) from None
    async with connect_stream(stream, params) as conn:
        yield conn


@contextlib.asynccontextmanager
async def connect_stream(
    stream: anyio.abc.ByteStream, params: ConnectionParameters | None = None
) -> AsyncIterator[Connection]:
    """Run the client over an already open byte stream (a proxy, a Unix socket, a test).

    Args:
        stream: Any anyio byte stream to the broker; it is closed on exit.
        params: Credentials, vhost and tuning; ``host`` and ``port`` are only used in
            messages. Defaults to guest/guest on vhost ``/``.

    The handshake must complete within ``params.connection_timeout``; otherwise it is
    the same as :func:`connect`.
    """
    params = params if params is not None else ConnectionParameters()
    conn = Connection(params)
    conn._stream = stream
    conn._clock = loop_clock()
    conn._direct = direct_sender(stream)
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            conn._task_group = tg
            tg.start_soon(conn._reader)
            tg.start_soon(conn._writer)
            opened = False
            with anyio.move_on_after(params.connection_timeout):
                opened = await conn._handshake()
            if not opened and conn._error is None:
                conn._fail(
                    ConnectionLost(
                        f"the broker at {params.url} did not complete the AMQP handshake "
                        f"within {params.connection_timeout:g} s"
                    )
                )
            if opened:
                tg.start_soon(conn._heartbeat)
                try:
                    yield conn
                except BaseException as exc:  # re-raised below, outside the task group
                    body_error = exc
                await conn._close()
            if conn._closed_by_broker is not None and not conn._close_ok_flush_tried:
                # Answer the broker's connection.close before dropping the socket
                # (during the handshake the reader may not have had the time to).
                with anyio.move_on_after(CLOSE_OK_FLUSH_TIMEOUT, shield=True):
                    await conn._flushed()
            tg.cancel_scope.cancel()
    finally:
        await anyio.aclose_forcefully(stream)
    error = conn._error
    if error is not None and (body_error is None or _is_fallout(body_error)):
        if body_error is not None and asyncio_cancel_requested():
            raise body_error
        raise error
    if body_error is not None:
        raise body_error


def asyncio_cancel_requested() -> bool:
    """True when, on asyncio, someone asked to cancel the current task (False on trio).

    The connection's own task group withdraws its cancellation requests when it
    exits, so a request still pending comes from an enclosing scope, a timeout or
    ``task.cancel()``; that cancellation must propagate rather than turn into the
    connection's error. (On trio, cancellation is level-triggered: an enclosing
    cancelled scope raises again at the caller's next checkpoint.)
    """
    asyncio = sys.modules.get("asyncio")  # not imported: not running on asyncio
    if asyncio is None:
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not running on asyncio
        return False
    return task is not None and task.cancelling() > 0


def _is_fallout(exc: BaseException) -> bool:
    """True when ``exc`` is only what a broken connection causes in the body.

    That is the cancellation of the connection's scope and the client's own errors,
    possibly grouped by task groups inside the body; the connection's error then
    replaces it, so that users see one ``ConnectionLost`` rather than a group.
    """
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_fallout(inner) for inner in exc.exceptions)
    return isinstance(exc, anyio.get_cancelled_exc_class() | AMQPError)


async def _open_stream(
    params: ConnectionParameters, ssl_context: ssl.SSLContext | None
) -> anyio.abc.ByteStream:
    """Open TCP, or TLS for ``amqps``, to the broker."""
    if params.tls and ssl_context is None:
        ssl_context = ssl.create_default_context(cafile=params.cafile)
        if params.certfile:
            ssl_context.load_cert_chain(params.certfile, params.keyfile)
    with _transport_errors(params, "while connecting"):
        if params.tls:
            return await anyio.connect_tcp(
                params.host,
                params.port,
                tls=True,
                ssl_context=ssl_context,
                tls_hostname=params.server_hostname or params.host,
                tls_standard_compatible=False,
            )
        return await anyio.connect_tcp(params.host, params.port)


def _evolve(params: ConnectionParameters, **changes: Any) -> ConnectionParameters:
    return attrs.evolve(params, **changes)
