"""The one place where publishing departs from pamqp's defaults: floats in headers.

pamqp encodes every Python ``float`` in a field table as a single-precision float
('f'), so a header of 0.1 arrives as 0.10000000149011612 and one of 1e300 cannot be
encoded at all. A consumer's retry and dead-letter copies carry the original's
headers, and RabbitMQ, Java and .NET clients (and pika since 1.3) send doubles ('d'):
re-encoding those as singles would change a message on its way to the dead-letter
queue, and an out-of-range one would make it impossible to copy. So the headers of
what we publish encode floats as doubles, with pamqp's own primitives; every other
value and every other property is encoded by pamqp as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pamqp import commands, common, encode

if TYPE_CHECKING:
    from pamqp.common import FieldArray, FieldTable, FieldValue

__all__ = ["exact_floats", "has_float"]


def has_float(value: object) -> bool:
    """True when ``value`` (a field value, table or array) holds a float at any depth."""
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(has_float(item) for item in value.values())
    if isinstance(value, list):
        return any(has_float(item) for item in value)
    return False


def _value(value: FieldValue | FieldTable | FieldArray) -> bytes:
    if isinstance(value, float):
        return b"d" + encode.double(value)
    if isinstance(value, dict):
        return b"F" + _table(value)
    if isinstance(value, list):
        return b"A" + _array(value)
    return encode.encode_table_value(value)


def _table(table: FieldTable) -> bytes:
    # pamqp's field_table, but with _value for the values (keys in the same order)
    data = b"".join(encode.short_string(key) + _value(item) for key, item in sorted(table.items()))
    return common.Struct.integer.pack(len(data)) + data


def _array(array: FieldArray) -> bytes:
    data = b"".join(_value(item) for item in array)
    return common.Struct.integer.pack(len(data)) + data


class _ExactFloatProperties(commands.Basic.Properties):
    """Basic.Properties whose ``headers`` encode floats as doubles."""

    def encode_property(self, name: str, value: FieldValue) -> bytes:
        if name == "headers" and isinstance(value, dict):
            return _table(value)
        return super().encode_property(name, value)


def exact_floats(properties: commands.Basic.Properties) -> commands.Basic.Properties:
    """``properties`` to encode: the same object, or, when its headers hold a float, a
    copy whose floats are encoded as doubles."""
    if not properties.headers or not has_float(properties.headers):
        return properties
    return _ExactFloatProperties(
        **{name: getattr(properties, name) for name in properties.__slots__}
    )
