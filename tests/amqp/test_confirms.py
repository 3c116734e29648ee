"""Publisher confirms on one channel, without a connection around them."""

from __future__ import annotations

import pytest

from strictconsume.amqp._confirms import PublishConfirms
from strictconsume.amqp._errors import RemoteProtocolError


def confirming(count: int = 0, *, mandatory: bool = False) -> PublishConfirms:
    confirms = PublishConfirms()
    confirms.select()
    for _ in range(count):
        confirms.published("ex", "rk", b"body", mandatory)
    return confirms


def test_publishes_are_numbered_from_one_only_in_confirm_mode() -> None:
    confirms = PublishConfirms()
    assert confirms.published("", "q", b"x", False) is None
    confirms.select()
    assert [confirms.published("", "q", b"x", False) for _ in range(3)] == [1, 2, 3]
    confirms.select()  # a second confirm.select does not restart the count
    assert confirms.published("", "q", b"x", False) == 4


def test_a_single_confirm_settles_exactly_its_tag() -> None:
    confirms = confirming(3)
    assert confirms.settle("Basic.Ack", 1, 2, False) == (2,)
    assert confirms.settle("Basic.Ack", 1, 3, True) == (1, 3)
    assert not confirms.unconfirmed
    assert not confirms.publish_order


def test_multiple_with_tag_zero_settles_everything_outstanding() -> None:
    confirms = confirming(4)
    confirms.settle("Basic.Nack", 1, 1, False)
    assert confirms.settle("Basic.Nack", 1, 0, True) == (2, 3, 4)


@pytest.mark.parametrize(
    ("tag", "multiple", "match"),
    [(5, False, "publish tag 5 .* not awaiting"), (1, False, "publish tag 1 .* not awaiting")],
)
def test_settling_a_tag_not_outstanding_is_the_brokers_error(
    tag: int, multiple: bool, match: str
) -> None:
    confirms = confirming(2)
    confirms.settle("Basic.Ack", 3, 1, False)
    with pytest.raises(RemoteProtocolError, match=match):
        confirms.settle("Basic.Ack", 3, tag, multiple)


def test_a_multiple_confirm_settling_nothing_is_the_brokers_error() -> None:
    confirms = confirming(2)
    confirms.settle("Basic.Ack", 3, 2, True)
    with pytest.raises(RemoteProtocolError, match=r"\(multiple\) for publish tag 2 on channel 3"):
        confirms.settle("Basic.Ack", 3, 2, True)


def test_a_confirm_outside_confirm_mode_is_the_brokers_error() -> None:
    with pytest.raises(RemoteProtocolError, match="channel 4, which is not in confirm mode"):
        PublishConfirms().settle("Basic.Ack", 4, 1, False)


def test_two_identical_mandatory_publishes_are_returned_in_publish_order() -> None:
    confirms = confirming(2, mandatory=True)
    assert confirms.match_return("ex", "rk", b"body") == 1
    assert confirms.match_return("ex", "rk", b"body") == 2
    assert confirms.match_return("ex", "rk", b"body") is None


def test_a_return_matches_only_the_same_exchange_key_and_body() -> None:
    confirms = confirming()
    confirms.published("ex", "a", b"1", True)
    confirms.published("ex", "b", b"1", True)
    confirms.published("other", "b", b"1", True)
    confirms.published("ex", "b", b"2", False)  # not mandatory: never returned
    assert confirms.match_return("ex", "b", b"2") is None
    assert confirms.match_return("other", "b", b"1") == 3
    assert confirms.match_return("ex", "b", b"1") == 2


def test_a_confirmed_publish_is_no_longer_returnable() -> None:
    confirms = confirming(2, mandatory=True)
    confirms.settle("Basic.Ack", 1, 1, False)
    assert confirms.match_return("ex", "rk", b"body") == 2


def test_forget_drops_everything_outstanding_but_keeps_the_count() -> None:
    confirms = confirming(2, mandatory=True)
    confirms.forget()
    assert (confirms.unconfirmed, list(confirms.publish_order), confirms.returnable) == (
        set(),
        [],
        {},
    )
    assert confirms.published("ex", "rk", b"body", False) == 3
