"""``@consumer``: a handler and the options of its queue, as a frozen :class:`ConsumerSpec`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, Unpack

import attrs

from ._middleware import Middleware, check_middleware
from ._retry import Retry

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from .idempotency import Idempotency


__all__ = [
    "SPEC_ATTRIBUTE",
    "Binding",
    "ConsumerOptions",
    "ConsumerSpec",
    "Handler",
    "check_options",
    "consumer",
]

#: An ``async def`` or plain ``def`` taking the message, its typed body, or both.
Handler = Callable[..., Awaitable[Any]] | Callable[..., Any]
H = TypeVar("H", bound=Callable[..., Any])

#: Where ``@consumer`` leaves the spec on the decorated function.
SPEC_ATTRIBUTE = "__strictconsume_consumer__"

QueueType = Literal["classic", "quorum"]
EXCHANGE_TYPES = frozenset({"direct", "topic", "fanout", "headers"})
MAX_PREFETCH = 65535  # basic.qos prefetch-count is a short
#: The delivery limit of a quorum queue when none is given (RabbitMQ 4's default).
DEFAULT_DELIVERY_LIMIT = 20


def handler_is_blocking(handler: Any, *, queue: str) -> bool:
    """Whether ``handler`` is a plain ``def`` (run in a thread) rather than an
    ``async def``.

    Raises:
        TypeError: it is not callable, or it is an async generator.
    """
    if not callable(handler):
        raise TypeError(f"the handler for queue {queue!r} must be callable, not {handler!r}")
    if inspect.iscoroutinefunction(handler):
        return False
    call = type(handler).__call__
    if not inspect.isfunction(handler) and inspect.iscoroutinefunction(call):
        return False  # an object with an async __call__
    if inspect.isasyncgenfunction(handler) or inspect.isasyncgenfunction(call):
        raise TypeError(
            f"the handler for queue {queue!r} must be an 'async def' or a plain 'def' "
            f"function, not an async generator: {handler!r}"
        )
    return True


def _queue_name(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, not {value!r}")
    if value.startswith("amq."):
        raise ValueError(f"queue names starting with 'amq.' are reserved by the broker: {value!r}")
    # the longest derived name, "<queue>.retry.<ms>", must fit in a short string
    if len(value.encode()) > 200:
        raise ValueError(f"queue name {value!r} is too long (at most 200 bytes)")


def _optional_positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 (or None), not {value!r}")


def _optional_prefetch(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PREFETCH:
        raise ValueError(f"{attribute.name} must be an int from 1 to {MAX_PREFETCH}: {value!r}")


def _optional_settings_name(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"settings_name must be a non-empty string (or None), not {value!r}")


@attrs.frozen
class Binding:
    """Bind the consumer's queue to ``exchange`` (declared, durable, of ``exchange_type``)
    with ``routing_key``. Exchanges named ``amq.*`` exist already and are only checked."""

    exchange: str = attrs.field()
    routing_key: str = ""
    exchange_type: str = attrs.field(default="direct")
    durable: bool = True
    arguments: FieldTable | None = attrs.field(default=None, eq=False)

    @exchange.validator
    def _check_exchange(self, attribute: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError(
                "a Binding needs an exchange name; the default exchange ('') routes by "
                "queue name already and cannot be bound"
            )

    @exchange_type.validator
    def _check_type(self, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in EXCHANGE_TYPES and not value.startswith("x-"):
            raise ValueError(
                f"exchange_type must be one of {sorted(EXCHANGE_TYPES)} or a plugin's "
                f"'x-...' type, not {value!r}"
            )


def _bindings(value: Iterable[Binding]) -> tuple[Binding, ...]:
    bindings = tuple(value)
    for binding in bindings:
        if not isinstance(binding, Binding):
            raise TypeError(f"bindings must be Binding objects, not {binding!r}")
    return bindings


def _retry(value: Retry | None) -> Retry:
    if value is None:
        return Retry()
    if not isinstance(value, Retry):
        raise TypeError(f"retry must be a strictconsume.Retry, not {value!r}")
    return value


def _middleware(value: Iterable[Middleware]) -> tuple[Middleware, ...]:
    middleware = tuple(value)
    for mw in middleware:
        check_middleware(mw)
    return middleware


@attrs.frozen
class ConsumerSpec:
    """One consumer: a handler, its queue and how the queue is consumed.

    Options left as None take the App's value (``prefetch``) or mean "none"
    (``timeout``: the handler may run forever, which start-up warns about, since the
    broker's ``consumer_timeout`` would then close the channel after 30 minutes).
    """

    queue: str = attrs.field(validator=_queue_name)
    handler: Handler = attrs.field(eq=False)
    prefetch: int | None = attrs.field(default=None, validator=_optional_prefetch)
    timeout: float | None = attrs.field(default=None, validator=_optional_positive)
    retry: Retry = attrs.field(factory=Retry, converter=_retry)
    bindings: tuple[Binding, ...] = attrs.field(default=(), converter=_bindings)
    queue_type: QueueType = attrs.field(
        default="classic", validator=attrs.validators.in_(("classic", "quorum"))
    )
    durable: bool = True
    concurrency: int | None = attrs.field(default=None, validator=_optional_prefetch)
    #: Extra queue arguments (``x-max-length``, ...), merged with the dead-letter ones.
    arguments: Mapping[str, Any] | None = attrs.field(default=None, eq=False)
    #: Quorum queues: deliveries of one message before the broker dead-letters it
    #: (None: :data:`DEFAULT_DELIVERY_LIMIT`; 0: no limit).
    delivery_limit: int | None = attrs.field(default=None)
    #: Seconds a delivery may stay unacked before the broker takes it back (the
    #: consumer argument ``x-consumer-timeout``); None: the broker's own setting.
    consumer_timeout: float | None = attrs.field(default=None, validator=_optional_positive)
    #: Middleware around this consumer's handler (inside the App's): see
    #: :mod:`._middleware`.
    middleware: tuple[Middleware, ...] = attrs.field(default=(), converter=_middleware, eq=False)
    #: False: the App declares and consumes nothing for this consumer (an operator
    #: turns it off per environment; see :mod:`._config`).
    enabled: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    #: The name settings files and variables use for this consumer (default: the queue).
    settings_name: str | None = attrs.field(default=None, validator=_optional_settings_name)
    #: Skip messages whose key was handled already (``strictconsume.Idempotency``).
    idempotency: Idempotency | None = attrs.field(default=None, eq=False)

    @idempotency.validator
    def _check_idempotency(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        from .idempotency import Idempotency

        if value is not None and not isinstance(value, Idempotency):
            raise TypeError(f"idempotency must be a strictconsume.Idempotency, not {value!r}")

    @delivery_limit.validator
    def _check_delivery_limit(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"delivery_limit must be an int >= 0 (or None), not {value!r}")
        if self.queue_type != "quorum":
            raise ValueError(
                f"queue {self.queue!r}: delivery_limit needs queue_type='quorum' (classic "
                "queues do not count deliveries)"
            )

    def broker_consumer_timeout(self, default: float) -> float | None:
        """Seconds the broker lets one of this consumer's deliveries stay unacked: its
        own ``consumer_timeout``, else ``default`` (the broker's setting as the App was
        told it); None when that is 0 (the broker's timeout disabled)."""
        return self.consumer_timeout or default or None

    @property
    def effective_delivery_limit(self) -> int | None:
        """The ``x-delivery-limit`` declared: None for classic queues and for 0."""
        if self.queue_type != "quorum":
            return None
        limit = DEFAULT_DELIVERY_LIMIT if self.delivery_limit is None else self.delivery_limit
        return limit or None

    def __attrs_post_init__(self) -> None:
        handler_is_blocking(self.handler, queue=self.queue)  # a TypeError if neither
        if self.queue_type == "quorum" and not self.durable:
            raise ValueError(f"queue {self.queue!r}: quorum queues are always durable")
        if self.arguments and "x-delivery-limit" in self.arguments:
            raise ValueError(
                f"queue {self.queue!r}: give the delivery limit as delivery_limit=, not in "
                "arguments (the consumer declares x-delivery-limit itself)"
            )
        if (
            self.concurrency is not None
            and self.prefetch is not None
            and self.concurrency > self.prefetch
        ):
            raise ValueError(
                f"queue {self.queue!r}: concurrency ({self.concurrency}) cannot exceed "
                f"prefetch ({self.prefetch}); the broker never sends more than prefetch"
            )

    @property
    def name(self) -> str:
        """The handler's qualified name, for logs."""
        handler = self.handler
        return f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', '?')}"


class ConsumerOptions(TypedDict, total=False):
    """The options of a consumer, as keyword arguments: written once here for
    :func:`consumer` and :meth:`App.consumer`, each one a field of
    :class:`ConsumerSpec` of the same name and type (a test checks that). An option
    left out takes the spec's default."""

    prefetch: int | None
    timeout: float | None
    retry: Retry | None
    bindings: Iterable[Binding]
    queue_type: QueueType
    durable: bool
    concurrency: int | None
    arguments: Mapping[str, Any] | None
    delivery_limit: int | None
    consumer_timeout: float | None
    middleware: Iterable[Middleware]
    enabled: bool
    settings_name: str | None
    idempotency: Idempotency | None


def check_options(options: Mapping[str, object], caller: str) -> None:
    """Refuse an option :class:`ConsumerOptions` does not name, as Python refuses an
    unknown keyword argument (at the call, not later at decoration)."""
    for name in options:
        if name not in ConsumerOptions.__annotations__:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")


def consumer(queue: str, **options: Unpack[ConsumerOptions]) -> Callable[[H], H]:
    """Declare a function as the handler of ``queue``: an ``async def``, or a plain
    ``def`` (run in a worker thread), taking the message, its typed body, or both.

    ``python -m strictconsume module`` collects every function of the module decorated
    this way into one App; :meth:`App.consumer` is the same decorator for one App.
    The function is returned unchanged, so tests can call it directly.

    Args:
        queue: The queue to consume; declared (with its retry queues and ``.dlq``).
        prefetch: Deliveries in flight at once (basic.qos); default: the App's.
        timeout: Seconds a handler may run before it is cancelled and the message
            treated as failed (``TimeoutError``); default none.
        retry: The retry policy; default ``Retry()`` (1 s, 10 s, 60 s, then .dlq).
        bindings: Exchanges to declare and bind the queue to.
        queue_type: ``"classic"`` or ``"quorum"``.
        durable: Declare the queue durable (default) so it survives a broker restart.
        concurrency: Run at most this many handlers at once (at most ``prefetch``).
        arguments: Extra queue arguments, such as ``{"x-max-length": 10000}``.
        delivery_limit: Quorum queues only: how often one message may be returned
            to the queue before the broker dead-letters it to ``.dlq``; default 20, 0
            for no limit. The broker counts a lost connection, and before RabbitMQ 4.3
            a requeue too; ``msg.attempt`` counts these returns (``x-delivery-count``).
        consumer_timeout: Seconds a delivery may stay unacked before the broker takes
            it back, for this consumer only (the consumer argument
            ``x-consumer-timeout``); default: the broker's ``consumer_timeout`` (30
            minutes). Sent where the broker honours it: RabbitMQ 3.12 and later, and
            from 4.3 for quorum queues only (4.3 enforces no consumer timeout on
            classic queues, and refuses the argument there).
        middleware: Middleware around this handler (inside the App's), the first
            outermost: ``async def mw(msg, call_next)`` or an async context manager
            factory taking the message.
        enabled: False to leave the consumer out: its queues are neither declared
            nor consumed. Usually set per environment rather than in code.
        settings_name: The name of the consumer in a settings file
            (``[consumers.NAME]``) and in ``STRICTCONSUME_CONSUMERS__NAME__*``
            variables; default: the queue's name.
        idempotency: Skip a message whose key (its ``message_id`` by default) was
            handled already: ``sc.Idempotency(store, key=..., ttl=...)``; it is acked
            as a ``duplicate`` without running the handler.
    """

    check_options(options, "consumer")

    def decorate(handler: H) -> H:
        spec = ConsumerSpec(queue=queue, handler=handler, **options)
        setattr(handler, SPEC_ATTRIBUTE, spec)
        return handler

    return decorate
