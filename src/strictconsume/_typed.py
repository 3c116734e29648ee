"""Typed bodies: from a handler parameter's annotation to a decoder of message bodies.

A handler may ask for its body decoded, by annotation::

    async def handle(order: Order) -> None: ...
    async def handle(order: Order, msg: sc.Message) -> None: ...

Each kind of type is decoded by its own library, never by code of ours:

=============================================  ====================================
the annotation                                 decoded by
=============================================  ====================================
a pydantic model (``BaseModel`` subclass)      pydantic's ``TypeAdapter``
a msgspec ``Struct``, a dataclass, an attrs    msgspec (``msgspec.json`` /
class, a ``TypedDict``, plain types            ``msgspec.msgpack``), else pydantic
(``int``, ``list[Order]``, ``dict[str, X]``)   when only pydantic is installed
``bytes`` / ``str``                            the body as it is / ``msg.text()``
``Any`` / ``object``                           JSON (or msgpack) to Python values
=============================================  ====================================

The content type chooses the format: ``application/msgpack`` (and
``application/x-msgpack``, ``application/vnd.msgpack``) is msgpack, through msgspec;
anything else, and none, is read as JSON, as :meth:`Message.json` does. A body that
does not decode or validate raises :class:`InvalidBody` (a :class:`DecodeError`): the
message is dead-lettered at once, with each error (field, problem) in
``x-error-message``. A type no installed library can decode is refused when the
decoder is built (at the App's start), naming what to install.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from ._message import DecodeError

if TYPE_CHECKING:
    from ._message import Message

__all__ = ["MSGPACK_CONTENT_TYPES", "BodyDecoder", "InvalidBody", "body_decoder", "is_msgpack"]

#: Content types read (and replied) as msgpack.
MSGPACK_CONTENT_TYPES = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
#: How many validation errors ``x-error-message`` lists (the rest are counted).
MAX_ERRORS = 20

INSTALL = "pip install 'strictconsume[msgspec]' (or 'strictconsume[pydantic]')"


class InvalidBody(DecodeError):
    """A message body that does not decode as, or validate against, the type its
    handler asked for. ``errors`` holds each problem as ``(field, problem)``, the field
    as a dotted path (``items.0.quantity``; ``""`` for the body as a whole)."""

    def __init__(self, message: str, errors: tuple[tuple[str, str], ...]) -> None:
        super().__init__(message)
        self.errors = errors


def is_msgpack(content_type: str | None) -> bool:
    """Whether ``content_type`` (parameters ignored) names msgpack."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() in MSGPACK_CONTENT_TYPES


def _type_name(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)


def _loaded(module: str) -> Any:
    """``module`` if it is installed, else None (imported only when needed)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _is_pydantic_model(tp: Any) -> bool:
    pydantic = sys.modules.get("pydantic")  # a pydantic model means pydantic is imported
    return pydantic is not None and isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _field(path: Any) -> str:
    return ".".join(str(part) for part in path)


@attrs.frozen
class BodyDecoder:
    """Decodes a message's body as ``type``, through the library chosen for it."""

    #: The annotation, as written.
    type: Any
    #: ``"pydantic"``, ``"msgspec"``, ``"json"`` (Any), ``"bytes"`` or ``"str"``.
    library: str
    _decode: Callable[[Message], Any] = attrs.field(repr=False)

    def __call__(self, msg: Message) -> Any:
        """The body of ``msg`` as :attr:`type`.

        Raises:
            InvalidBody: the body is not valid for the type (or not JSON / msgpack).
            DecodeError: ``str`` asked for and the body is not UTF-8.
        """
        return self._decode(msg)


def _invalid(msg: Message, tp: Any, errors: list[tuple[str, str]]) -> InvalidBody:
    shown = errors[:MAX_ERRORS]
    text = "; ".join(f"{field}: {problem}" if field else problem for field, problem in shown)
    if len(errors) > MAX_ERRORS:
        text += f"; and {len(errors) - MAX_ERRORS} more"
    return InvalidBody(
        f"the body of message {msg.message_id!r} from queue {msg.queue!r} is not a valid "
        f"{_type_name(tp)}: {text}",
        tuple(errors),
    )


def _msgpack_needed(msg: Message, tp: Any) -> InvalidBody:
    return _invalid(
        msg,
        tp,
        [("", f"content type {msg.content_type!r} needs msgspec to decode: {INSTALL}")],
    )


def _custom_types(node: Any, seen: set[int]) -> list[Any]:
    """The classes msgspec would treat as custom types (which it can only decode with
    a hook of ours) in the type-info tree ``node``."""
    if id(node) in seen:
        return []
    seen.add(id(node))
    inspect = sys.modules["msgspec.inspect"]
    if isinstance(node, inspect.CustomType):
        return [node.cls]
    found = []
    for name in node.__struct_fields__:
        value = getattr(node, name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, inspect.Type | inspect.Field):
                found += _custom_types(item, seen)
    return found


def _msgspec_decoder(tp: Any, msgspec: Any) -> Callable[[Message], Any]:
    """msgspec's decoders for ``tp`` (TypeError when msgspec cannot decode it)."""
    importlib.import_module("msgspec.inspect")
    custom = _custom_types(msgspec.inspect.type_info(tp), set())
    if custom:
        names = ", ".join(sorted({_type_name(cls) for cls in custom}))
        raise TypeError(f"it does not know how to decode {names}")
    as_json = msgspec.json.Decoder(tp)
    as_msgpack = msgspec.msgpack.Decoder(tp)
    errors = (msgspec.ValidationError, msgspec.DecodeError)

    def decode(msg: Message) -> Any:
        try:
            if is_msgpack(msg.content_type):
                return as_msgpack.decode(msg.body)
            return as_json.decode(msg.body)
        except errors as exc:
            raise _invalid(msg, tp, [_msgspec_error(exc, msgspec)]) from exc

    return decode


def _msgspec_error(exc: Exception, msgspec: Any) -> tuple[str, str]:
    """(field, problem) of msgspec's error: "Expected `int`, got `str` - at `$.n`"."""
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError) and " - at `$" in text:
        problem, _, path = text.rpartition(" - at `$")
        return path.rstrip("`").lstrip("."), problem
    return "", text


def _pydantic_decoder(tp: Any, pydantic: Any) -> Callable[[Message], Any]:
    """pydantic's validator for ``tp`` (its schema error when it cannot build one)."""
    adapter = pydantic.TypeAdapter(tp)
    msgspec = _loaded("msgspec")

    def decode(msg: Message) -> Any:
        try:
            if is_msgpack(msg.content_type):
                if msgspec is None:
                    raise _msgpack_needed(msg, tp)
                try:
                    value = msgspec.msgpack.decode(msg.body)
                except msgspec.DecodeError as exc:
                    raise _invalid(msg, tp, [("", str(exc))]) from exc
                return adapter.validate_python(value)
            return adapter.validate_json(msg.body)
        except pydantic.ValidationError as exc:
            problems = [(_field(error["loc"]), error["msg"]) for error in exc.errors()]
            raise _invalid(msg, tp, problems) from exc

    return decode


def _any_decoder(tp: Any) -> Callable[[Message], Any]:
    msgspec = _loaded("msgspec")

    def decode(msg: Message) -> Any:
        if not is_msgpack(msg.content_type):
            try:
                return json.loads(msg.body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _invalid(msg, tp, [("", f"not JSON: {exc}")]) from exc
        if msgspec is None:
            raise _msgpack_needed(msg, tp)
        try:
            return msgspec.msgpack.decode(msg.body)
        except msgspec.DecodeError as exc:
            raise _invalid(msg, tp, [("", str(exc))]) from exc

    return decode


def body_decoder(tp: Any, *, where: str) -> BodyDecoder:
    """The decoder of bodies annotated ``tp``; ``where`` names the parameter for errors.

    Raises:
        TypeError: no installed library decodes ``tp``; the message says what to install.
    """
    if tp is bytes:
        return BodyDecoder(tp, "bytes", lambda msg: msg.body)
    if tp is str:
        return BodyDecoder(tp, "str", lambda msg: msg.text())
    if tp is Any or tp is object:
        return BodyDecoder(tp, "json", _any_decoder(tp))
    if _is_pydantic_model(tp):
        return BodyDecoder(tp, "pydantic", _pydantic_decoder(tp, sys.modules["pydantic"]))
    problems: list[str] = []
    msgspec = _loaded("msgspec")
    if msgspec is not None:
        try:
            return BodyDecoder(tp, "msgspec", _msgspec_decoder(tp, msgspec))
        except TypeError as exc:
            problems.append(f"msgspec: {exc}")
    pydantic = _loaded("pydantic")  # imported only when msgspec cannot do it
    if pydantic is not None:
        try:
            return BodyDecoder(tp, "pydantic", _pydantic_decoder(tp, pydantic))
        except pydantic.PydanticUserError as exc:
            problems.append(f"pydantic: {str(exc).splitlines()[0]}")
    if not problems:
        kind = (
            "a dataclass"
            if dataclasses.is_dataclass(tp)
            else "an attrs class"
            if attrs.has(tp)
            else f"{_type_name(tp)!r}"
        )
        raise TypeError(
            f"{where}: decoding a body as {kind} needs msgspec or pydantic, and neither is "
            f"installed: {INSTALL}"
        )
    raise TypeError(
        f"{where}: no installed library can decode a body as {_type_name(tp)!r} "
        f"({'; '.join(problems)}); annotate it with a pydantic model, a msgspec Struct, "
        "a dataclass, an attrs class, a TypedDict or plain types, or take the "
        "sc.Message and decode it yourself"
    )
