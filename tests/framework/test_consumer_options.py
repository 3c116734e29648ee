"""The consumer options are defined once (ConsumerOptions) and reach the spec
unchanged through both decorators."""

from __future__ import annotations

import typing
from pathlib import Path

import attrs
import pytest

import strictconsume as sc
from strictconsume._consumer import ConsumerOptions
from strictconsume.idempotency import SQLiteStore


async def handler(msg: sc.Message) -> None:
    pass


async def middleware(msg: sc.Message, call_next: sc.CallNext) -> object:
    return await call_next(msg)


def test_the_options_are_the_specs_fields_with_the_same_types() -> None:
    fields = {f.name: f.type for f in attrs.fields(sc.ConsumerSpec)}
    options = ConsumerOptions.__annotations__
    assert set(options) == set(fields) - {"queue", "handler"}
    for name, hint in options.items():
        text: object = hint.__forward_arg__ if isinstance(hint, typing.ForwardRef) else hint
        spec_type: object = fields[name]
        # retry, bindings and middleware are converted: None becomes Retry(), an
        # iterable a tuple
        if name == "retry":
            assert (text, spec_type) == ("Retry | None", "Retry")
        elif name == "bindings":
            assert (text, spec_type) == ("Iterable[Binding]", "tuple[Binding, ...]")
        elif name == "middleware":
            assert (text, spec_type) == ("Iterable[Middleware]", "tuple[Middleware, ...]")
        else:
            assert text == spec_type, name


def test_both_decorators_give_the_spec_every_option(tmp_path: Path) -> None:
    idempotency = sc.Idempotency(SQLiteStore(tmp_path / "handled.db"))
    options: ConsumerOptions = {
        "prefetch": 20,
        "timeout": 5.0,
        "retry": sc.Retry(delays=(2.0,)),
        "bindings": [sc.Binding("orders", routing_key="created")],
        "queue_type": "quorum",
        "durable": True,
        "concurrency": 4,
        "arguments": {"x-max-length": 10},
        "delivery_limit": 3,
        "consumer_timeout": 60.0,
        "middleware": [middleware],
        "idempotency": idempotency,
    }
    app = sc.App()
    app.consumer("orders", **options)(handler)
    decorated = sc.consumer("orders", **options)(handler)
    (registered,) = app.consumers
    for spec in (registered, decorated.__strictconsume_consumer__):  # type: ignore[attr-defined]
        assert spec == sc.ConsumerSpec(queue="orders", handler=handler, **options)
        # not part of the spec's equality
        assert spec.arguments == {"x-max-length": 10}
        assert spec.middleware == (middleware,)
        assert spec.idempotency is idempotency
    assert sc.consumer("orders")(handler).__strictconsume_consumer__ == sc.ConsumerSpec(  # type: ignore[attr-defined]
        "orders", handler
    )


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: sc.consumer("q", prefetchh=3), "consumer"),  # type: ignore[call-arg]
        (lambda: sc.App().consumer("q", retries=3), "App.consumer"),  # type: ignore[call-arg]
        (lambda: sc.consumer("q", handler=handler), "consumer"),  # type: ignore[call-arg]
    ],
)
def test_an_unknown_option_is_refused_at_the_call(call: typing.Any, name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument '"):
        call()
