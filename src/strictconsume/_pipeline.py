"""How a handler is called: the one object the dispatcher and the testing helpers run.

When the App starts (and in each call of :func:`strictconsume.testing.run_handler`),
every consumer's handler is inspected once and turned into a :class:`Pipeline`::

    Pipeline(msg)
      App middleware, then the consumer's         (:mod:`._middleware`; first outermost)
        decode the typed body                     (:mod:`._typed`, by annotation)
        await handler(...)                        an ``async def``
        | to_thread.run_sync(handler, ...)        a plain ``def``, in a worker thread
      the return value -> reply, if reply_to      (:mod:`._reply`), before the ack

What the handler takes is read from its signature, annotations resolved
(``inspect.signature(eval_str=True)``, as ``typing.get_type_hints`` does): a
parameter annotated :class:`Message` gets the message, one other parameter the body
decoded as its annotation, and a single parameter without annotation the message
(``async def h(msg)``). A signature that cannot be served, an annotation that does not
resolve or a type no installed library decodes is a :class:`TypeError` naming the
handler, raised when the pipeline is built: the App makes it a start-up error.

Blocking handlers: a plain ``def`` runs in one of anyio's worker threads, at most
``concurrency`` (else the prefetch) of them at once for one consumer (a
:class:`anyio.CapacityLimiter`), so the event loop, its heartbeats and the other
consumers never wait for it. A thread cannot be cancelled: when the handler's timeout
(or a shutdown's end of grace) comes, the message's outcome is decided then (a
``TimeoutError``, or a requeue), the thread is left to finish on its own, no longer
counted by the limiter, and what it returns or raises later is logged and ignored.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._consumer import handler_is_blocking
from ._message import Message
from ._middleware import CallNext, Middleware, compose
from ._reply import Replier, make_reply
from ._typed import BodyDecoder, body_decoder

if TYPE_CHECKING:
    from ._consumer import ConsumerSpec

__all__ = ["Pipeline", "build_pipeline"]

logger = logging.getLogger("strictconsume")


def _name(handler: object) -> str:
    inner = getattr(handler, "func", handler)  # functools.partial
    module = getattr(inner, "__module__", "?")
    return f"{module}.{getattr(inner, '__qualname__', type(inner).__qualname__)}"


def _is_message(annotation: Any) -> bool:
    """``Message`` (or a subclass), also as ``Message | None``."""
    if isinstance(annotation, type):
        return issubclass(annotation, Message)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return len(members) == 1 and _is_message(members[0])
    return False


#: How a handler's arguments are made from a message.
Arguments = Callable[[Message], tuple[tuple[Any, ...], dict[str, Any]]]


def _arguments(spec: ConsumerSpec) -> tuple[Arguments | None, BodyDecoder | None]:
    """How to call ``spec``'s handler: None for "with the message alone", else a
    function making its arguments; and the body's decoder, if it takes one."""
    handler = spec.handler
    where = f"the handler {_name(handler)} of queue {spec.queue!r}"
    try:
        signature = inspect.signature(handler, eval_str=True)
    except NameError as exc:
        raise TypeError(
            f"{where}: an annotation does not resolve ({exc}); import the type in the "
            "handler's module, at module level"
        ) from exc
    except ValueError:
        return None, None  # no signature to read (a builtin): give it the message
    required = [
        p
        for p in signature.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and (p.default is p.empty or _is_message(p.annotation))
    ]
    if not required:
        if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
            return None, None  # a wrapper taking *args: the message
        raise TypeError(
            f"{where} takes no parameter: it must take the message (msg: sc.Message), "
            "its body (order: Order), or both"
        )
    first = next(iter(signature.parameters.values()))
    # the one parameter that handler(msg) fills
    first_positional = first if first.kind is not first.KEYWORD_ONLY else None
    if len(required) == 1 and required[0].annotation is inspect.Parameter.empty:
        if required[0] is not first_positional:
            raise TypeError(
                f"{where}: parameter {required[0].name!r} has no annotation; annotate the "
                "message as sc.Message"
            )
        return None, None  # async def h(msg): the message
    makers: list[tuple[inspect.Parameter, Callable[[Message], Any]]] = []
    decoder: BodyDecoder | None = None
    decoder_param = ""
    for param in required:
        if _is_message(param.annotation):
            makers.append((param, _the_message))
            continue
        if param.annotation is inspect.Parameter.empty:
            raise TypeError(
                f"{where}: parameter {param.name!r} has no annotation; annotate the "
                "message as sc.Message and the body with its type"
            )
        if decoder is not None:
            raise TypeError(
                f"{where}: parameters {decoder_param!r} and {param.name!r} both ask for "
                "the body; a handler takes one body parameter (and optionally the "
                "sc.Message)"
            )
        decoder_param = param.name
        decoder = body_decoder(param.annotation, where=f"{where}, parameter {param.name!r}")
        makers.append((param, decoder))
    if len(makers) == 1 and makers[0][1] is _the_message and required[0] is first_positional:
        return None, None
    # Positionally while no parameter before was left to its default, else by name.
    bound = {param.name: make for param, make in makers}
    positional: list[Callable[[Message], Any]] = []
    keyword: list[tuple[str, Callable[[Message], Any]]] = []
    in_order = True
    for param in signature.parameters.values():
        make = bound.get(param.name)
        is_positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
        if make is None:
            in_order = in_order and not is_positional
        elif in_order and is_positional:
            positional.append(make)
        elif param.kind is param.POSITIONAL_ONLY:
            raise TypeError(
                f"{where}: positional-only parameter {param.name!r} comes after one left "
                "to its default; reorder the parameters"
            )
        else:
            keyword.append((param.name, make))

    def arguments(msg: Message) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (
            tuple(make(msg) for make in positional),
            {name: make(msg) for name, make in keyword},
        )

    return arguments, decoder


def _the_message(msg: Message) -> Message:
    return msg


class _Thread:
    """One call of a blocking handler: whether its outcome was decided without it."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


def _late(name: str, queue: str, msg: Message, what: str) -> None:
    logger.warning(
        "queue %r: the handler %s %s after the outcome of message %r (delivery_tag %d) "
        "was decided (its timeout, or a shutdown, came first); ignored",
        queue,
        name,
        what,
        msg.message_id,
        msg.delivery_tag,
        extra={"event": "late_result", "queue": queue, "message_id": msg.message_id},
    )


class _Threads:
    """The worker threads of one consumer's blocking handler, bounded by a limiter
    made in the running event loop at the first call."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.total)
        return self._limiter


def _blocking_call(spec: ConsumerSpec, arguments: Arguments | None, threads: _Threads) -> CallNext:
    handler: Callable[..., Any] = spec.handler
    name, queue = _name(handler), spec.queue

    async def call(msg: Message) -> Any:
        args, kwargs = arguments(msg) if arguments is not None else ((msg,), {})
        thread = _Thread()

        def run() -> Any:
            try:
                result = handler(*args, **kwargs)
            except BaseException as exc:
                if thread.abandoned:
                    _late(name, queue, msg, f"raised {type(exc).__name__}: {exc}")
                raise
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()  # never run: no "never awaited" warning
                raise TypeError(
                    f"the handler {name} of queue {queue!r} is a plain def that returned "
                    f"an awaitable ({type(result).__name__}); declare it 'async def' so "
                    "that it runs in the event loop"
                )
            if thread.abandoned:
                _late(name, queue, msg, "returned")
            return result

        try:
            return await anyio.to_thread.run_sync(
                run, limiter=threads.limiter, abandon_on_cancel=True
            )
        except BaseException:
            thread.abandoned = True  # cancelled (or failed): a late end is not ours
            raise

    return call


def _async_call(spec: ConsumerSpec, arguments: Arguments | None) -> CallNext:
    handler: Callable[..., Awaitable[Any]] = spec.handler
    if arguments is None:
        return handler

    async def call(msg: Message) -> Any:
        args, kwargs = arguments(msg)
        return await handler(*args, **kwargs)

    return call


class Pipeline:
    """A consumer's handler as the App calls it: ``await pipeline(msg)`` decodes the
    body, runs the middleware and the handler, publishes the reply (when the message
    has ``reply_to``) and returns what the handler returned."""

    __slots__ = ("_call", "_reply", "blocking", "body", "name", "queue")

    def __init__(
        self,
        *,
        name: str,
        queue: str,
        call: CallNext,
        blocking: bool,
        body: BodyDecoder | None,
        reply: Replier | None,
    ) -> None:
        self.name = name
        self.queue = queue
        self.blocking = blocking
        #: The body's decoder, when the handler takes a typed body.
        self.body = body
        self._call = call
        self._reply = reply

    def __repr__(self) -> str:
        kind = "def" if self.blocking else "async def"
        body = f", body {self.body.library}:{self.body.type!r}" if self.body else ""
        return f"<Pipeline {kind} {self.name} of queue {self.queue!r}{body}>"

    async def __call__(self, msg: Message) -> Any:
        result = await self._call(msg)
        if self._reply is not None and msg.properties.reply_to:
            await self._reply(make_reply(result, msg))
        return result


def build_pipeline(
    spec: ConsumerSpec,
    *,
    middleware: Sequence[Middleware] = (),
    reply: Replier | None = None,
    threads: int | None = None,
) -> Pipeline:
    """The pipeline of ``spec``'s handler.

    Args:
        middleware: The App's middleware, outside the consumer's own.
        reply: Publishes a reply; None: replies are not sent.
        threads: The most worker threads a blocking handler uses at once (default:
            the consumer's concurrency, else its prefetch, else 64).

    Raises:
        TypeError: the handler's signature or body type cannot be served.
    """
    arguments, body = _arguments(spec)
    blocking = handler_is_blocking(spec.handler, queue=spec.queue)
    if blocking:
        total = threads or spec.concurrency or spec.prefetch or 64
        call = _blocking_call(spec, arguments, _Threads(total))
    else:
        call = _async_call(spec, arguments)
    return Pipeline(
        name=_name(spec.handler),
        queue=spec.queue,
        call=compose((*middleware, *spec.middleware), call),
        blocking=blocking,
        body=body,
        reply=reply,
    )
