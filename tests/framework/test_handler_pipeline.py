"""The handler pipeline without a broker: typed bodies, blocking handlers, middleware
and replies, through ``strictconsume.testing`` (which runs the pipeline the App runs)
and through the pipeline itself.

The types are defined at module level: annotations are resolved in the handler's
module, as the App does at start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypedDict

import anyio
import anyio.to_thread
import attrs
import msgspec
import pydantic
import pytest

import strictconsume as sc
from strictconsume import _typed
from strictconsume._pipeline import build_pipeline
from strictconsume.testing import run_handler

pytestmark = pytest.mark.anyio


class Order(pydantic.BaseModel):
    id: int
    quantity: int = pydantic.Field(gt=0)
    sku: str


class Invoice(msgspec.Struct):
    number: int
    total: float


@dataclasses.dataclass
class Point:
    x: int
    y: int


@attrs.define
class Parcel:
    weight: float
    to: str


class Address(TypedDict):
    street: str
    city: str


class Unknown:
    """A plain class: no library decodes it."""

    def __init__(self, value: int) -> None:
        self.value = value


GOOD_ORDER: dict[str, Any] = {"id": 7, "quantity": 2, "sku": "A-1"}


# -- typed bodies ----------------------------------------------------------------------


async def test_a_pydantic_body_is_validated_and_given_to_the_handler() -> None:
    seen: list[Order] = []

    async def handler(order: Order) -> None:
        seen.append(order)

    result = await run_handler(handler, json=GOOD_ORDER)
    assert result.outcome == "ack"
    assert seen == [Order(id=7, quantity=2, sku="A-1")]


async def test_an_invalid_pydantic_body_is_dead_lettered_at_once_with_each_error() -> None:
    async def handler(order: Order) -> None:
        raise AssertionError("never called")

    result = await run_handler(
        handler, json={"id": "seven", "quantity": 0}, message_id="m-1", retry=sc.Retry((1.0,))
    )
    assert result.outcome == "dead_letter"  # not retried, although the policy has delays
    assert isinstance(result.error, sc.InvalidBody)
    assert isinstance(result.error, sc.DecodeError)
    assert [field for field, _ in result.error.errors] == ["id", "quantity", "sku"]
    message = result.headers["x-error-message"]
    assert isinstance(message, str)
    assert message.startswith("the body of message 'm-1' from queue 'test' is not a valid Order: ")
    assert "id: Input should be a valid integer" in message
    assert "quantity: Input should be greater than 0" in message
    assert "sku: Field required" in message
    assert result.headers["x-error-type"] == "strictconsume.InvalidBody"


async def test_a_body_that_is_not_json_is_dead_lettered() -> None:
    async def handler(order: Order) -> None:
        raise AssertionError("never called")

    result = await run_handler(handler, b"{not json", content_type="application/json")
    assert result.outcome == "dead_letter"
    assert result.reason is not None
    assert "is not a valid Order: Invalid JSON" in result.reason


async def test_a_msgspec_struct_from_json_and_from_msgpack() -> None:
    seen: list[Invoice] = []

    async def handler(invoice: Invoice) -> None:
        seen.append(invoice)

    assert (await run_handler(handler, json={"number": 1, "total": 9.5})).acked
    packed = msgspec.msgpack.encode({"number": 2, "total": 1.25})
    assert (await run_handler(handler, packed, content_type="application/msgpack")).acked
    assert (await run_handler(handler, packed, content_type="application/x-msgpack")).acked
    assert seen == [Invoice(1, 9.5), Invoice(2, 1.25), Invoice(2, 1.25)]
    bad = await run_handler(handler, json={"number": "one", "total": 1})
    assert bad.outcome == "dead_letter"
    assert isinstance(bad.error, sc.InvalidBody)
    assert bad.error.errors == (("number", "Expected `int`, got `str`"),)


async def test_a_pydantic_model_from_msgpack() -> None:
    seen: list[Order] = []

    async def handler(order: Order) -> None:
        seen.append(order)

    packed = msgspec.msgpack.encode(GOOD_ORDER)
    assert (await run_handler(handler, packed, content_type="application/msgpack")).acked
    assert seen == [Order(**GOOD_ORDER)]
    garbage = await run_handler(handler, b"\xc1", content_type="application/msgpack")
    assert garbage.outcome == "dead_letter"


@pytest.mark.parametrize(
    ("annotation", "body", "expected"),
    [
        (Point, {"x": 1, "y": 2}, Point(1, 2)),
        (Parcel, {"weight": 1.5, "to": "Oslo"}, Parcel(1.5, "Oslo")),
        (Address, {"street": "Main 1", "city": "Oslo"}, {"street": "Main 1", "city": "Oslo"}),
        (list[int], [1, 2, 3], [1, 2, 3]),
        (dict[str, Point], {"a": {"x": 0, "y": 1}}, {"a": Point(0, 1)}),
        (list[Order], [GOOD_ORDER], [Order(**GOOD_ORDER)]),  # msgspec cannot: pydantic
        (Any, {"free": ["form"]}, {"free": ["form"]}),
    ],
)
async def test_dataclasses_attrs_typeddicts_and_plain_types(
    annotation: Any, body: Any, expected: Any
) -> None:
    seen: list[Any] = []

    async def handler(value: Any) -> None:
        seen.append(value)

    handler.__annotations__["value"] = annotation
    result = await run_handler(handler, json=body)
    assert result.outcome == "ack", result.reason
    assert seen == [expected]


async def test_the_body_and_the_message_together_in_any_order() -> None:
    seen: list[tuple[Point, str | None]] = []

    async def handler(point: Point, msg: sc.Message) -> None:
        seen.append((point, msg.message_id))

    async def reversed_handler(msg: sc.Message, *, point: Point) -> None:
        seen.append((point, msg.message_id))

    await run_handler(handler, json={"x": 1, "y": 1}, message_id="a")
    await run_handler(reversed_handler, json={"x": 2, "y": 2}, message_id="b")
    assert seen == [(Point(1, 1), "a"), (Point(2, 2), "b")]


async def test_bytes_and_str_bodies() -> None:
    seen: list[object] = []

    async def raw(body: bytes) -> None:
        seen.append(body)

    async def text(body: str) -> None:
        seen.append(body)

    await run_handler(raw, b"\x00\xff")
    await run_handler(text, "hé")
    bad = await run_handler(text, b"\xff")
    assert seen == [b"\x00\xff", "hé"]
    assert bad.outcome == "dead_letter"
    assert isinstance(bad.error, sc.DecodeError)


async def test_a_type_no_library_decodes_is_refused_naming_the_handler() -> None:
    async def handler(value: Unknown) -> None:
        pass

    with pytest.raises(TypeError) as info:
        await run_handler(handler, json={})
    text = str(info.value)
    assert "test_handler_pipeline." in text
    assert ".handler of queue 'test'" in text
    assert "parameter 'value'" in text
    assert "no installed library can decode a body as 'Unknown'" in text


async def test_a_missing_library_is_refused_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_typed, "_loaded", lambda module: None)

    async def handler(point: Point) -> None:
        pass

    with pytest.raises(TypeError, match=r"needs msgspec or pydantic, and neither is installed: "):
        await run_handler(handler, json={"x": 1, "y": 1})
    with pytest.raises(TypeError, match=r"pip install 'strictconsume\[msgspec\]'"):
        await run_handler(handler, json={"x": 1, "y": 1})


async def test_msgpack_without_msgspec_is_dead_lettered_saying_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def handler(order: Order) -> None:
        raise AssertionError("never called")

    monkeypatch.setattr(_typed, "_loaded", lambda module: None)
    result = await run_handler(handler, b"\x80", content_type="application/msgpack")
    assert result.outcome == "dead_letter"
    assert result.reason is not None
    assert "needs msgspec to decode: pip install" in result.reason


async def test_signatures_that_cannot_be_served_are_refused() -> None:
    async def two_bodies(a: Point, b: Point) -> None:
        pass

    async def unannotated_pair(a: Point, b) -> None:  # type: ignore[no-untyped-def]
        pass

    async def nothing() -> None:
        pass

    async def unresolved(a: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    cases: list[tuple[Callable[..., Any], str]] = [
        (two_bodies, "parameters 'a' and 'b' both ask for the body"),
        (unannotated_pair, "parameter 'b' has no annotation"),
        (nothing, "takes no parameter"),
        (unresolved, "an annotation does not resolve"),
    ]
    for handler, message in cases:
        with pytest.raises(TypeError, match=message):
            await run_handler(handler, b"")


async def test_an_unannotated_parameter_and_defaults_keep_the_message() -> None:
    seen: list[object] = []

    async def legacy(msg) -> None:  # type: ignore[no-untyped-def]
        seen.append(msg)

    async def with_default(msg: sc.Message, extra: int = 3) -> None:
        seen.append(extra)

    await run_handler(legacy, b"x")
    await run_handler(with_default, b"x")
    assert isinstance(seen[0], sc.Message)
    assert seen[1] == 3


async def test_parameters_after_one_left_to_its_default_are_passed_by_name() -> None:
    seen: list[object] = []

    async def handler(flag: bool = False, msg: sc.Message | None = None, *, point: Point) -> None:
        seen.extend([flag, msg, point])

    async def wrapper(*args: Any, **kwargs: Any) -> None:
        seen.append(args)

    await run_handler(handler, json={"x": 1, "y": 2}, message_id="k")
    assert seen[0] is False
    assert isinstance(seen[1], sc.Message)
    assert seen[2] == Point(1, 2)
    await run_handler(wrapper, b"w")
    (args,) = seen[3:]
    assert isinstance(args, tuple)
    assert [type(arg) for arg in args] == [sc.Message]


async def test_a_def_handler_that_returns_an_awaitable_fails_saying_so() -> None:
    result = await run_handler(lambda msg: _noop(msg), b"x")
    assert result.outcome == "retry"
    assert result.reason is not None
    assert "is a plain def that returned an awaitable (coroutine); declare it 'async def'" in (
        result.reason
    )


async def test_a_bad_type_is_a_startup_error_before_any_connection() -> None:
    app = sc.App(url="amqp://guest:guest@127.0.0.1:9/")  # nothing listens there

    @app.consumer("orders")
    async def handler(value: Unknown) -> None:
        pass

    with pytest.raises(sc.StartupError, match=r"handler .*handler of queue 'orders'"):
        async with app.running():
            pass


# -- blocking handlers -----------------------------------------------------------------


async def test_a_plain_def_runs_in_a_worker_thread() -> None:
    threads: list[int] = []

    def handler(point: Point, msg: sc.Message) -> None:
        threads.append(threading.get_ident())
        if point.x < 0:
            raise ValueError("negative")

    ok = await run_handler(handler, json={"x": 1, "y": 1})
    failed = await run_handler(handler, json={"x": -1, "y": 1})
    assert ok.acked
    assert (failed.outcome, failed.reason) == ("retry", "ValueError: negative")
    assert len(threads) == 2
    assert threading.get_ident() not in threads


async def test_a_blocking_handler_past_its_timeout_is_decided_then_and_its_late_end_logged() -> (
    None
):
    release = threading.Event()
    finished = threading.Event()
    late: list[logging.LogRecord] = []
    logged = threading.Event()

    class Late(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "late_result":
                late.append(record)
                logged.set()

    def handler(msg: sc.Message) -> str:
        release.wait(10)
        finished.set()
        return "late"

    result = await run_handler(handler, b"x", timeout=0.05, message_id="slow-1")
    assert result.outcome == "retry"
    assert isinstance(result.error, TimeoutError)
    assert "its worker thread runs on" in str(result.error)
    assert not finished.is_set()  # decided while the thread still runs
    logger = logging.getLogger("strictconsume")
    watcher = Late()
    logger.addHandler(watcher)
    try:
        release.set()
        assert await anyio.to_thread.run_sync(logged.wait, 5)
    finally:
        logger.removeHandler(watcher)
    (record,) = late
    assert "returned after the outcome of message 'slow-1'" in record.getMessage()


async def test_blocking_handlers_use_at_most_their_threads_and_never_block_the_loop() -> None:
    lock = threading.Lock()
    running = 0
    most = 0
    gate = threading.Event()

    def handler(msg: sc.Message) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        gate.wait(10)
        with lock:
            running -= 1

    pipeline = build_pipeline(sc.ConsumerSpec("q", handler, concurrency=2, prefetch=10))
    assert pipeline.blocking
    ticks = 0
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(pipeline, (await run_handler(_noop, b"")).message)
        while most < 2:  # the loop keeps running while threads block
            ticks += 1
            await anyio.sleep(0.005)
        await anyio.sleep(0.05)
        assert (most, running) == (2, 2)
        gate.set()
    assert most == 2
    assert ticks > 0


async def _noop(msg: sc.Message) -> None:
    pass


# -- middleware ------------------------------------------------------------------------


async def test_app_middleware_wraps_the_consumers_which_wraps_the_handler() -> None:
    events: list[str] = []

    async def app_mw(msg: sc.Message, call_next: sc.CallNext) -> Any:
        events.append("app in")
        value = await call_next(msg)
        events.append(f"app out {value}")
        return value

    @contextlib.asynccontextmanager
    async def consumer_mw(msg: sc.Message) -> AsyncIterator[None]:
        events.append("consumer in")
        yield
        events.append("consumer out")

    app = sc.App(middleware=[app_mw])

    @app.consumer("orders", middleware=[consumer_mw])
    async def handler(order: Order) -> int:
        events.append(f"handler {order.id}")
        return order.id

    result = await run_handler(handler, json=GOOD_ORDER, app=app)
    assert result.acked
    assert result.value == 7
    assert events == ["app in", "consumer in", "handler 7", "consumer out", "app out 7"]


async def test_middleware_can_veto_translate_and_see_a_bad_body() -> None:
    seen: list[str] = []

    async def veto(msg: sc.Message, call_next: sc.CallNext) -> Any:
        if msg.headers.get("tenant") == "blocked":
            raise sc.Reject("tenant blocked")
        return await call_next(msg)

    class Translate:
        """A class whose instances are async context managers: KeyError -> Reject."""

        def __init__(self, msg: sc.Message) -> None:
            self.msg = msg

        async def __aenter__(self) -> None:
            pass

        async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
            if kind is not None:
                seen.append(kind.__name__)
            if kind is KeyError:
                raise sc.Reject("unknown key")

    calls: list[int] = []

    @sc.consumer("orders", middleware=[veto, Translate])
    async def handler(order: Order) -> None:
        calls.append(order.id)
        if order.sku == "missing":
            raise KeyError(order.sku)

    blocked = await run_handler(handler, json=GOOD_ORDER, headers={"tenant": "blocked"})
    translated = await run_handler(handler, json={**GOOD_ORDER, "sku": "missing"})
    invalid = await run_handler(handler, json={"id": 1})
    assert (blocked.outcome, blocked.reason) == (
        "dead_letter",
        "strictconsume.Reject: tenant blocked",
    )
    assert (translated.outcome, translated.reason) == (
        "dead_letter",
        "strictconsume.Reject: unknown key",
    )
    assert invalid.outcome == "dead_letter"
    assert seen == ["KeyError", "InvalidBody"]
    assert calls == [7]


async def test_middleware_wraps_a_blocking_handler_in_the_event_loop() -> None:
    where: list[str] = []

    async def mw(msg: sc.Message, call_next: sc.CallNext) -> Any:
        where.append(f"mw on {threading.current_thread().name}")
        return await call_next(msg)

    def handler(msg: sc.Message) -> None:
        where.append(
            "handler in a worker"
            if threading.current_thread() is not threading.main_thread()
            else "handler on the loop"
        )

    await run_handler(handler, b"x", middleware=[mw])
    assert where == [f"mw on {threading.main_thread().name}", "handler in a worker"]


def test_what_is_not_middleware_is_refused() -> None:
    async def one_argument(msg: sc.Message) -> None:
        pass

    def plain(msg: sc.Message) -> None:
        pass

    with pytest.raises(TypeError, match=r"must take two arguments, \(msg, call_next\)"):
        sc.App(middleware=[one_argument])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"an async context manager factory"):
        sc.consumer("q", middleware=[plain])(_noop)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"an async context manager factory"):
        sc.App().add_middleware(42)  # type: ignore[arg-type]


# -- replies ---------------------------------------------------------------------------


async def test_a_request_gets_the_return_value_as_its_reply() -> None:
    async def handler(order: Order) -> dict[str, Any]:
        return {"accepted": order.id}

    result = await run_handler(handler, json=GOOD_ORDER, reply_to="replies", correlation_id="c-9")
    assert result.acked
    assert result.reply is not None
    assert result.reply.routing_key == "replies"
    assert result.reply.correlation_id == "c-9"
    assert result.reply.content_type == "application/json"
    assert json.loads(result.reply.body) == {"accepted": 7}


@pytest.mark.parametrize(
    ("value", "body", "content_type"),
    [
        (None, b"", None),
        (b"\x01\x02", b"\x01\x02", "application/octet-stream"),
        ("hé", "hé".encode(), "text/plain; charset=utf-8"),
        (Order(**GOOD_ORDER), b'{"id":7,"quantity":2,"sku":"A-1"}', "application/json"),
        (Invoice(1, 2.5), b'{"number":1,"total":2.5}', "application/json"),
        (Point(1, 2), b'{"x":1,"y":2}', "application/json"),
        ([1, "a"], b'[1,"a"]', "application/json"),
    ],
)
async def test_what_a_reply_carries(value: Any, body: bytes, content_type: str | None) -> None:
    async def handler(msg: sc.Message) -> Any:
        return value

    result = await run_handler(handler, b"", reply_to="r")
    assert result.reply is not None
    assert (result.reply.body, result.reply.content_type) == (body, content_type)


async def test_a_msgpack_request_gets_a_msgpack_reply() -> None:
    def handler(invoice: Invoice) -> Invoice:  # a blocking handler replies too
        return Invoice(invoice.number, invoice.total * 2)

    packed = msgspec.msgpack.encode({"number": 3, "total": 2.0})
    result = await run_handler(handler, packed, content_type="application/msgpack", reply_to="r")
    assert result.reply is not None
    assert result.reply.content_type == "application/msgpack"
    assert msgspec.msgpack.decode(result.reply.body) == {"number": 3, "total": 4.0}


async def test_a_value_that_cannot_be_a_reply_fails_the_run() -> None:
    async def handler(msg: sc.Message) -> object:
        return object()

    result = await run_handler(handler, b"", reply_to="r")
    assert result.outcome == "retry"
    assert result.reply is None
    assert result.reason is not None
    assert "returned a object, which cannot be encoded as the reply to 'r'" in result.reason


async def test_no_reply_without_reply_to() -> None:
    async def handler(msg: sc.Message) -> str:
        return "ignored"

    result = await run_handler(handler, b"")
    assert (result.value, result.reply) == ("ignored", None)
