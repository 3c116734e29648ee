"""The events module on its own: values, the hidden password, the version parser."""

from __future__ import annotations

import typing

import attrs
import pytest

from strictconsume.amqp import _events
from strictconsume.amqp._events import Credentials, Event, server_version, text


def test_the_password_is_never_shown() -> None:
    assert "s3cret" not in repr(Credentials("guest", "s3cret"))


def test_every_event_is_a_frozen_attrs_value() -> None:
    members = typing.get_args(Event)
    assert len(members) == 16
    for event in members:
        assert attrs.has(event), event
        assert event.__setattr__ is not object.__setattr__, f"{event.__name__} is not frozen"
    assert set(members) <= {getattr(_events, name) for name in _events.__all__}


@pytest.mark.parametrize(
    ("version", "numbers"),
    [
        ("4.3.6", (4, 3, 6)),
        (b"3.13.7+2", (3, 13, 7)),
        ("4.1.0-rc.1", (4, 1, 0)),
        ("4", (4, 0, 0)),
        ("v4", None),
        (None, None),
    ],
)
def test_server_version(version: object, numbers: tuple[int, int, int] | None) -> None:
    properties = {} if version is None else {"version": version}
    assert server_version(properties) == numbers


def test_text_decodes_what_pamqp_leaves_as_bytes() -> None:
    assert text(b"caf\xe9") == "café"
    assert text(None) == ""
    assert text("x") == "x"
