"""Unit tests of the framework's pure parts: no sockets, no event loop.

The ack tracker (exact frames, and a property test against a model of the broker's
unacked set), the reconnect backoff, the outcome table, Message, the retry topology
names, consumer validation, settings resolution and the command line's loading of
``MODULE[:ATTR]``.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import strictconsume
from strictconsume import (
    App,
    Binding,
    ConsumerSpec,
    DecodeError,
    Message,
    Reject,
    Requeue,
    Retry,
    RetryLater,
    SettingsError,
    consumer,
)
from strictconsume._acks import Ack, AckTracker
from strictconsume._backoff import DEFAULT_BACKOFF, Backoff
from strictconsume._cli import UsageError, load_app, main
from strictconsume._consumer import SPEC_ATTRIBUTE
from strictconsume._message import attempt_of
from strictconsume._outcome import MAX_ERROR_MESSAGE, Outcome, OutcomeKind, decide, error_type
from strictconsume._retry import (
    dead_letter_queue_name,
    delay_ms,
    main_queue_arguments,
    retry_queue_arguments,
    retry_queue_name,
)
from strictconsume._settings import DEFAULT_URL, Settings, resolve_settings
from strictconsume._topology import queue_arguments, retry_arguments
from strictconsume.amqp import Delivery, Properties

PASSWORD = "Pw-unit-9QxZ-never-shown"


async def _handler(msg: Message) -> None:
    """An async handler for specs."""


# -- 1. the ack tracker: exact frames --------------------------------------------------


def pending(tracker: AckTracker) -> int:
    """``tracker.pending``, read through a call so that mypy does not narrow it."""
    return tracker.pending


def tracker_with(*tags: int) -> AckTracker:
    tracker = AckTracker()
    for tag in tags:
        tracker.received(tag)
    return tracker


def test_ack_above_a_gap_is_single_then_the_head_alone() -> None:
    tracker = tracker_with(1, 2, 3, 4, 5)
    tracker.finished(2)
    tracker.finished(3)
    assert pending(tracker)
    assert tracker.flush() == [Ack(2), Ack(3)]
    assert not pending(tracker)
    assert tracker.flush() == []
    # 2 and 3 are acked already: the head's ack must not be multiple (it would be
    # harmless, but a single ack is what settles exactly the one tag left).
    tracker.finished(1)
    assert tracker.flush() == [Ack(1)]
    assert tracker.unsettled == 2
    tracker.finished(4)
    tracker.finished(5)
    assert tracker.flush() == [Ack(5, multiple=True)]
    assert tracker.unsettled == 0


def test_contiguous_prefix_is_one_multiple_ack() -> None:
    tracker = tracker_with(1, 2, 3, 4, 5)
    for tag in (3, 1, 2):
        tracker.finished(tag)
    assert tracker.flush() == [Ack(3, multiple=True)]
    assert tracker.unsettled == 2
    tracker.finished(5)
    assert tracker.flush() == [Ack(5)]  # 4 still running: 5 singly
    tracker.finished(4)
    assert tracker.flush() == [Ack(4)]  # 5 was acked already: 4 alone
    assert tracker.unsettled == 0


def test_prefix_and_tags_above_the_gap_in_one_flush() -> None:
    tracker = tracker_with(1, 2, 3, 4, 5, 6, 7)
    for tag in (7, 1, 2, 5):
        tracker.finished(tag)
    # 1-2 contiguous (multiple); 3 runs; 5 and 7 above the gap, singly, ascending.
    assert tracker.flush() == [Ack(2, multiple=True), Ack(5), Ack(7)]
    tracker.finished(3)
    tracker.finished(4)
    # 3, 4 finished, 5 acked singly already, 6 running: the ack stops before 6.
    assert tracker.flush() == [Ack(4, multiple=True)]
    tracker.finished(6)
    assert tracker.flush() == [Ack(6)]
    assert tracker.unsettled == 0


def test_nacked_tags_inside_the_prefix_are_covered_not_counted() -> None:
    tracker = tracker_with(1, 2, 3, 4)
    tracker.settled(2)  # nacked by the dispatcher while 1 runs
    assert tracker.unsettled == 3
    assert not pending(tracker)
    assert tracker.flush() == []
    tracker.finished(1)
    tracker.finished(3)
    # One multiple-ack of 3 settles 1 and 3; 2 is no longer unacked on the broker.
    assert tracker.flush() == [Ack(3, multiple=True)]
    tracker.finished(4)
    assert tracker.flush() == [Ack(4)]


def test_a_single_finished_tag_among_settled_ones_is_a_single_ack() -> None:
    tracker = tracker_with(1, 2, 3)
    tracker.settled(2)
    tracker.settled(3)
    tracker.finished(1)
    assert tracker.flush() == [Ack(1)]
    assert tracker.unsettled == 0


def test_settled_head_is_dropped_at_once() -> None:
    tracker = tracker_with(1, 2, 3)
    tracker.settled(1)
    tracker.finished(3)
    assert tracker.flush() == [Ack(3)]
    tracker.finished(2)
    assert tracker.flush() == [Ack(2)]
    assert tracker.unsettled == 0
    tracker.received(4)
    tracker.finished(4)
    assert tracker.flush() == [Ack(4)]


def test_every_tag_finished_before_one_flush_is_one_ack() -> None:
    tracker = tracker_with(*range(1, 101))
    for tag in reversed(range(1, 101)):
        tracker.finished(tag)
    assert tracker.flush() == [Ack(100, multiple=True)]


def test_non_contiguous_tags_keep_the_gap() -> None:
    tracker = tracker_with(10, 20, 30)
    tracker.finished(20)
    assert tracker.flush() == [Ack(20)]
    tracker.finished(10)
    tracker.finished(30)
    assert tracker.flush() == [Ack(30, multiple=True)]


@pytest.mark.parametrize(
    ("received", "steps", "bad"),
    [
        pytest.param((1, 2, 3), [], 4, id="never-received-above"),
        pytest.param((1, 2, 3), [], 0, id="zero"),
        pytest.param((), [], 1, id="nothing-received"),
        pytest.param((1, 2, 3), ["finish 2"], 2, id="finished-twice"),
        pytest.param((1, 2, 3), ["finish 1", "flush"], 1, id="after-its-multiple-ack"),
        pytest.param((1, 2, 3), ["finish 3", "flush"], 3, id="after-its-single-ack"),
        pytest.param((1, 2, 3), ["settle 2"], 2, id="after-a-nack"),
        pytest.param((1, 2, 3), ["settle 1"], 1, id="after-a-nack-of-the-head"),
        # 2 was never received (the channel's tags jumped): it is unknown too.
        pytest.param((1, 3), [], 2, id="in-a-gap-of-received-tags"),
    ],
)
@pytest.mark.parametrize("how", ["finished", "settled"])
def test_settling_an_unknown_tag_raises(
    received: tuple[int, ...], steps: list[str], bad: int, how: str
) -> None:
    tracker = tracker_with(*received)
    for step in steps:
        verb, _, tag = step.partition(" ")
        if verb == "finish":
            tracker.finished(int(tag))
        elif verb == "settle":
            tracker.settled(int(tag))
        else:
            tracker.flush()
    with pytest.raises(ValueError, match=rf"^delivery tag {bad} is not awaiting settlement$"):
        getattr(tracker, how)(bad)


@pytest.mark.parametrize(("first", "second"), [(3, 3), (3, 2), (1, 0)])
def test_received_tags_must_increase(first: int, second: int) -> None:
    tracker = tracker_with(first)
    with pytest.raises(ValueError, match=rf"^delivery tags must increase: {second} after {first}"):
        tracker.received(second)


def test_first_tag_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must increase"):
        AckTracker().received(0)


def test_memory_stays_bounded_behind_one_stuck_tag() -> None:
    """200,000 messages go past tag 1, whose handler never finishes (prefetch 64,
    a flush per 8). The tracker must hold what is in flight, not what went past: the
    old one kept every tag above the gap until tag 1 settled (about 14 MiB here, and
    a final flush that walked them all)."""
    prefetch, batch, total = 64, 8, 200_000
    tracker = tracker_with(1)
    acked = 0
    in_flight: list[int] = []
    tracemalloc.start()
    try:
        for tag in range(2, total + 1):
            tracker.received(tag)
            in_flight.append(tag)
            if len(in_flight) == prefetch - 1:
                for done in in_flight[:batch]:
                    tracker.finished(done)
                del in_flight[:batch]
                acks = tracker.flush()
                assert not any(ack.multiple for ack in acks)  # above the gap: singly
                acked += len(acks)
                assert tracker.unsettled <= prefetch
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
    assert acked == total - 1 - len(in_flight)  # every finished tag, singly
    for done in in_flight:
        tracker.finished(done)
    tracker.finished(1)
    final = tracker.flush()
    assert final == [Ack(total, multiple=True)]
    assert tracker.unsettled == 0


# -- 2. the ack tracker against a model of the broker --------------------------------------


class BrokerModel:
    """The broker's unacked set of one channel, applying ack/nack semantics strictly."""

    def __init__(self) -> None:
        self.unacked: set[int] = set()
        self.acked: list[int] = []

    def apply(self, ack: Ack, *, done: set[int], running: set[int]) -> None:
        # RabbitMQ closes the channel (406 unknown delivery tag) when the tag given
        # is not unacked, with or without ``multiple``.
        assert ack.delivery_tag in self.unacked, f"{ack} names a tag not unacked"
        if ack.multiple:
            covered = {t for t in self.unacked if t <= ack.delivery_tag}
        else:
            covered = {ack.delivery_tag}
        assert not covered & running, f"{ack} acks running tags {sorted(covered & running)}"
        assert covered <= done, f"{ack} acks tags never finished: {sorted(covered - done)}"
        self.unacked -= covered
        self.acked.extend(covered)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), count=st.integers(min_value=1, max_value=30))
def test_tracker_acks_exactly_the_finished_tags_and_never_a_running_one(
    data: st.DataObject, count: int
) -> None:
    tracker = AckTracker()
    broker = BrokerModel()
    running: set[int] = set()
    done: set[int] = set()  # handlers that finished (to be acked)
    nacked: set[int] = set()
    next_tag = 1

    def flush() -> None:
        acks = tracker.flush()
        for ack in acks:
            broker.apply(ack, done=done, running=running)
        # A flush leaves no finished tag unacked: a slow message holds nothing back.
        assert not (done - set(broker.acked))
        assert not tracker.pending

    while next_tag <= count or running:
        # The simplest choice (the first) makes progress, so that shrinking ends.
        actions = []
        if next_tag <= count:
            actions.append("receive")
        if running:
            actions += ["finish", "nack", "finish"]
        actions.append("flush")
        action = data.draw(st.sampled_from(actions))
        if action == "receive":
            tracker.received(next_tag)
            broker.unacked.add(next_tag)
            running.add(next_tag)
            next_tag += 1
        elif action == "flush":
            flush()
        else:
            tag = data.draw(st.sampled_from(sorted(running)))
            running.discard(tag)
            if action == "finish":
                tracker.finished(tag)
                done.add(tag)
            else:  # the dispatcher sent basic.nack itself
                tracker.settled(tag)
                broker.unacked.discard(tag)
                nacked.add(tag)
        assert tracker.unsettled == len(running) + len(done - set(broker.acked))
    flush()
    assert broker.unacked == set()
    assert sorted(broker.acked) == sorted(done)  # each finished tag acked exactly once
    assert done | nacked == set(range(1, count + 1))
    assert tracker.unsettled == 0


def test_ad_hoc_retry_delays_use_a_bounded_set_of_expiring_queues() -> None:
    """Jittered ``RetryLater(delay=uniform(1, 60))`` used to make one durable queue
    per distinct millisecond (tens of thousands); now at most 19, each within 16 % of
    the delay asked for. The policy's delays keep their exact queues, without
    ``x-expires``; the ad-hoc ones expire once unused for their TTL plus two hours."""
    rng = random.Random(14)
    spec = ConsumerSpec("orders", _noop_handler, retry=RETRY)
    queues: set[str] = set()
    for _ in range(100_000):
        asked = rng.uniform(1, 60)
        outcome = decide(RetryLater(asked), attempt=1, retry=RETRY)
        assert outcome.delay is not None
        assert abs(outcome.delay / asked - 1) <= 0.155
        queues.add(retry_queue_name("orders", outcome.delay))
    assert len(queues) <= 19
    for delay in RETRY.delays:  # exactly the policy's own queue
        assert decide(RetryLater(delay), attempt=1, retry=RETRY).delay == delay
        assert "x-expires" not in retry_arguments(spec, delay)
    assert retry_arguments(spec, 8.0)["x-expires"] == 8000 + 7_200_000


async def _noop_handler(msg: Message) -> None:
    pass


# -- 3. backoff --------------------------------------------------------------------------


def test_backoff_ceilings_double_from_half_a_second_up_to_30() -> None:
    ceilings = [DEFAULT_BACKOFF.ceiling(n) for n in range(10)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert DEFAULT_BACKOFF.ceiling(10_000) == 30.0  # no overflow
    assert DEFAULT_BACKOFF.reset_after == 60.0


def test_backoff_delay_is_ceiling_times_fraction() -> None:
    assert DEFAULT_BACKOFF.delay(0, 0.0) == 0.0
    assert DEFAULT_BACKOFF.delay(0, 0.5) == 0.25
    assert DEFAULT_BACKOFF.delay(3, 0.25) == 1.0
    assert DEFAULT_BACKOFF.delay(8, 0.5) == 15.0
    assert DEFAULT_BACKOFF.delay(8, 1.0) == 30.0
    assert DEFAULT_BACKOFF.delay(2, 0.75) == 1.5
    assert Backoff(base=1.0, factor=3.0, cap=100.0).delay(2, 0.75) == 6.75


@given(attempt=st.integers(0, 200), fraction=st.floats(0.0, 1.0))
def test_backoff_delay_stays_within_its_ceiling(attempt: int, fraction: float) -> None:
    delay = DEFAULT_BACKOFF.delay(attempt, fraction)
    assert 0.0 <= delay <= DEFAULT_BACKOFF.ceiling(attempt) <= 30.0
    assert delay == DEFAULT_BACKOFF.ceiling(attempt) * fraction


def test_custom_backoff_caps_and_base_above_cap() -> None:
    policy = Backoff(base=1.0, factor=10.0, cap=50.0)
    assert [policy.ceiling(n) for n in range(4)] == [1.0, 10.0, 50.0, 50.0]
    assert Backoff(base=40.0, cap=30.0).ceiling(0) == 30.0
    assert [Backoff(factor=1.0).ceiling(n) for n in (0, 5, 500)] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": 0.0}, "base must be > 0"),
        ({"base": -1.0}, "base must be > 0"),
        ({"cap": 0.0}, "cap must be > 0"),
        ({"reset_after": 0.0}, "reset_after must be > 0"),
        ({"factor": 0.5}, "factor"),
    ],
)
def test_backoff_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


@pytest.mark.parametrize(
    ("attempt", "fraction", "message"),
    [
        (-1, 0.5, "attempt must be >= 0"),
        (0, -0.1, "random_fraction must be in"),
        (0, 1.5, "random_fraction must be in"),
        (0, float("nan"), "random_fraction must be in"),
    ],
)
def test_backoff_delay_validation(attempt: int, fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DEFAULT_BACKOFF.delay(attempt, fraction)


# -- 4. the outcome table ------------------------------------------------------------------


class AppError(Exception):
    class Nested(Exception):
        pass


RETRY = Retry(delays=(1.0, 10.0, 60.0))


def test_return_is_ack() -> None:
    assert decide(None, attempt=1, retry=RETRY) == Outcome(OutcomeKind.ACK)
    assert decide(None, attempt=99, retry=Retry(delays=())) == Outcome(OutcomeKind.ACK)


@pytest.mark.parametrize("attempt", [1, 4])
def test_reject_dead_letters_at_once(attempt: int) -> None:
    assert decide(Reject("no such customer"), attempt=attempt, retry=RETRY) == Outcome(
        OutcomeKind.DEAD_LETTER,
        error_type="strictconsume.Reject",
        error_message="no such customer",
    )


@pytest.mark.parametrize(("attempt", "delay"), [(1, 1.0), (2, 10.0), (3, 60.0)])
def test_retry_later_without_delay_takes_the_policys(attempt: int, delay: float) -> None:
    assert decide(RetryLater(), attempt=attempt, retry=RETRY) == Outcome(
        OutcomeKind.RETRY,
        delay=delay,
        error_type="strictconsume.RetryLater",
        error_message="retry",
    )


def test_retry_later_with_delay_overrides_the_policys() -> None:
    outcome = decide(RetryLater(delay=2.5), attempt=2, retry=RETRY)
    assert outcome == Outcome(
        OutcomeKind.RETRY,
        delay=2.5,
        error_type="strictconsume.RetryLater",
        error_message="retry in 2.5 s",
    )
    # 7 s is not in the policy: the nearest ad-hoc step (a bounded set of queues).
    assert decide(RetryLater(7, reason="rate limited"), attempt=1, retry=RETRY) == Outcome(
        OutcomeKind.RETRY,
        delay=8.0,
        error_type="strictconsume.RetryLater",
        error_message="rate limited",
    )


@pytest.mark.parametrize("error", [RetryLater(), RetryLater(delay=5.0)])
def test_retry_later_counts_as_an_attempt(error: RetryLater) -> None:
    assert decide(error, attempt=4, retry=RETRY) == Outcome(
        OutcomeKind.DEAD_LETTER,
        error_type="strictconsume.RetryLater",
        error_message=str(error),
    )
    assert decide(error, attempt=1, retry=Retry(delays=())).kind is OutcomeKind.DEAD_LETTER


@pytest.mark.parametrize("delay", [0.0, 0.0005, -1.0, 2**31 / 1000 + 1])
def test_retry_later_delay_bounds(delay: float) -> None:
    with pytest.raises(ValueError, match="RetryLater delay must be between"):
        RetryLater(delay=delay)


@pytest.mark.parametrize("attempt", [1, 4, 100])
def test_requeue_is_not_an_attempt(attempt: int) -> None:
    assert decide(Requeue(), attempt=attempt, retry=RETRY) == Outcome(OutcomeKind.REQUEUE)


def test_decode_error_dead_letters_without_retry() -> None:
    assert decide(DecodeError("not JSON"), attempt=1, retry=RETRY) == Outcome(
        OutcomeKind.DEAD_LETTER,
        error_type="strictconsume.DecodeError",
        error_message="not JSON",
    )


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ValueError("bad value"), "ValueError"),
        (TimeoutError("the handler exceeded its timeout of 2 s"), "TimeoutError"),
        (KeyError("sku"), "KeyError"),
        (AppError("boom"), f"{__name__}.AppError"),
        (AppError.Nested("deep"), f"{__name__}.AppError.Nested"),
    ],
)
def test_other_exceptions_retry_per_policy_then_dead_letter(error: Exception, kind: str) -> None:
    message = str(error)
    for attempt, delay in [(1, 1.0), (2, 10.0), (3, 60.0)]:
        assert decide(error, attempt=attempt, retry=RETRY) == Outcome(
            OutcomeKind.RETRY, delay=delay, error_type=kind, error_message=message
        )
    for attempt in (4, 5, 1000):
        assert decide(error, attempt=attempt, retry=RETRY) == Outcome(
            OutcomeKind.DEAD_LETTER, error_type=kind, error_message=message
        )
    assert decide(error, attempt=1, retry=Retry(delays=())) == Outcome(
        OutcomeKind.DEAD_LETTER, error_type=kind, error_message=message
    )


def test_exception_groups_of_one_are_unwrapped() -> None:
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [Reject("bad")])])
    assert decide(nested, attempt=1, retry=RETRY) == Outcome(
        OutcomeKind.DEAD_LETTER, error_type="strictconsume.Reject", error_message="bad"
    )
    assert decide(ExceptionGroup("g", [Requeue()]), attempt=1, retry=RETRY) == Outcome(
        OutcomeKind.REQUEUE
    )
    assert decide(ExceptionGroup("g", [KeyError("k")]), attempt=1, retry=RETRY) == Outcome(
        OutcomeKind.RETRY, delay=1.0, error_type="KeyError", error_message="'k'"
    )
    assert decide(ExceptionGroup("g", [RetryLater(delay=3.0)]), attempt=1, retry=RETRY) == Outcome(
        OutcomeKind.RETRY,
        delay=3.0,
        error_type="strictconsume.RetryLater",
        error_message="retry in 3 s",
    )


def test_exception_group_of_several_is_an_ordinary_error() -> None:
    group = ExceptionGroup("two failures", [Reject("a"), ValueError("b")])
    outcome = decide(group, attempt=1, retry=RETRY)
    assert (outcome.kind, outcome.delay, outcome.error_type) == (
        OutcomeKind.RETRY,
        1.0,
        "ExceptionGroup",
    )
    assert outcome.error_message == str(group)


def test_error_type_strings() -> None:
    assert error_type(ValueError()) == "ValueError"
    assert error_type(Reject()) == "strictconsume.Reject"
    assert error_type(RetryLater()) == "strictconsume.RetryLater"
    assert error_type(DecodeError()) == "strictconsume.DecodeError"
    assert error_type(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")) == "UnicodeDecodeError"
    assert error_type(AppError()) == f"{__name__}.AppError"


@pytest.mark.parametrize(
    ("length", "expected_length", "truncated"),
    [(10, 10, False), (MAX_ERROR_MESSAGE, MAX_ERROR_MESSAGE, False), (100_000, 4096, True)],
)
def test_long_error_messages_are_truncated(
    length: int, expected_length: int, truncated: bool
) -> None:
    text = "".join(itertools.islice(itertools.cycle("abcdefghij"), length))
    for error in (ValueError(text), Reject(text)):
        outcome = decide(error, attempt=1, retry=RETRY)
        assert len(outcome.error_message) == expected_length
        if truncated:
            assert outcome.error_message == text[: MAX_ERROR_MESSAGE - 3] + "..."
        else:
            assert outcome.error_message == text


# -- 5. Message ----------------------------------------------------------------------------


def delivery(
    body: bytes = b'{"id": 7}',
    *,
    headers: dict[str, Any] | None = None,
    exchange: str = "shop",
    routing_key: str = "order.created",
    redelivered: bool = False,
    **properties: Any,
) -> Delivery:
    return Delivery(
        channel_id=2,
        consumer_tag="sc-2-1",
        delivery_tag=42,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key,
        properties=Properties(headers=headers, **properties),
        body=body,
    )


def test_message_from_delivery() -> None:
    when = datetime.datetime(2024, 5, 1, 12, 0, 0)
    msg = Message.from_delivery(
        delivery(
            redelivered=True,
            message_id="m-1",
            correlation_id="c-1",
            content_type="application/json",
            reply_to="replies",
            timestamp=when,
        ),
        "orders",
    )
    assert msg.body == b'{"id": 7}'
    assert (msg.delivery_tag, msg.redelivered, msg.consumer_tag) == (42, True, "sc-2-1")
    assert (msg.exchange, msg.routing_key, msg.queue) == ("shop", "order.created", "orders")
    assert msg.attempt == 1
    assert msg.headers == {}
    assert (msg.message_id, msg.correlation_id) == ("m-1", "c-1")
    assert (msg.content_type, msg.reply_to, msg.timestamp) == (
        "application/json",
        "replies",
        when,
    )
    assert msg.json() == {"id": 7}
    assert msg.text() == '{"id": 7}'
    assert repr(msg) == (
        "<Message queue='orders' delivery_tag=42 message_id='m-1' attempt=1 body=9 bytes>"
    )


@pytest.mark.parametrize(
    ("value", "attempt"),
    [
        (3, 3),
        (1, 1),
        ("4", 4),
        (b"5", 5),
        ("12", 12),
        ("garbage", 1),
        ("", 1),
        ("-2", 1),
        ("2.5", 1),
        (0, 1),
        (-3, 1),
        (True, 1),
        (2.0, 1),
        (None, 1),
        ([2], 1),
    ],
)
def test_attempt_from_the_header(value: Any, attempt: int) -> None:
    msg = Message.from_delivery(delivery(headers={"x-attempt": value}), "orders")
    assert msg.attempt == attempt
    assert attempt_of({"x-attempt": value}) == attempt


def test_attempt_without_headers() -> None:
    assert attempt_of(None) == 1
    # x-delivery-count counts only where asked (a quorum queue), and never garbled
    assert attempt_of({"x-attempt": 2, "x-delivery-count": 3}) == 2
    assert attempt_of({"x-attempt": 2, "x-delivery-count": 3}, delivery_count=True) == 5
    assert attempt_of({"x-delivery-count": 1}, delivery_count=True) == 2
    assert attempt_of({"x-delivery-count": "²"}, delivery_count=True) == 1
    assert attempt_of({"x-delivery-count": -4}, delivery_count=True) == 1
    assert attempt_of({}) == 1
    assert attempt_of({"other": 5}) == 1


def test_delivery_count_counts_on_a_quorum_redelivery_only() -> None:
    headers = {"x-attempt": 2, "x-delivery-count": 3}
    redelivered = delivery(headers=headers, redelivered=True)
    assert Message.from_delivery(redelivered, "orders", delivery_count=True).attempt == 5
    assert Message.from_delivery(redelivered, "orders").attempt == 2  # a classic queue
    # a first delivery whose publisher copied the header from another message
    first = delivery(headers=headers, redelivered=False)
    assert Message.from_delivery(first, "orders", delivery_count=True).attempt == 2


def test_original_routing_is_restored_on_a_retried_copy() -> None:
    retried = delivery(
        exchange="",
        routing_key="orders",  # dead-lettered from orders.retry.1000 back to orders
        headers={
            "x-attempt": 2,
            "x-original-exchange": "shop",
            "x-original-routing-key": "order.created",
        },
    )
    msg = Message.from_delivery(retried, "orders")
    assert (msg.exchange, msg.routing_key, msg.attempt) == ("shop", "order.created", 2)
    as_bytes = delivery(
        exchange="",
        routing_key="orders",
        headers={"x-original-exchange": b"", "x-original-routing-key": b"order.paid"},
    )
    msg = Message.from_delivery(as_bytes, "orders")
    assert (msg.exchange, msg.routing_key) == ("", "order.paid")


def test_original_exchange_alone_changes_nothing() -> None:
    msg = Message.from_delivery(delivery(headers={"x-original-exchange": "other"}), "orders")
    assert (msg.exchange, msg.routing_key) == ("shop", "order.created")


@pytest.mark.parametrize(
    ("body", "method", "fragment"),
    [
        (b"\xff\xfe{}", "json", "is not valid utf-8 (byte 0: invalid start byte)"),
        (b"\xff\xfe{}", "text", "is not valid utf-8 (byte 0: invalid start byte)"),
        (b"", "json", "is not JSON: Expecting value at line 1 column 1"),
        (b"not json", "json", "is not JSON: Expecting value at line 1 column 1"),
        (b'{"a": 1', "json", "is not JSON: Expecting ',' delimiter at line 1 column 8"),
    ],
)
def test_undecodable_bodies_raise_decode_error_naming_the_queue(
    body: bytes, method: str, fragment: str
) -> None:
    msg = Message.from_delivery(delivery(body, message_id="m-9"), "orders")
    with pytest.raises(DecodeError) as exc_info:
        getattr(msg, method)()
    text = str(exc_info.value)
    assert text.startswith("the body of message 'm-9' from queue 'orders' ")
    assert fragment in text
    assert isinstance(exc_info.value, ValueError)
    assert decide(exc_info.value, attempt=1, retry=RETRY).kind is OutcomeKind.DEAD_LETTER


def test_text_of_an_empty_body_and_other_encodings() -> None:
    assert Message.from_delivery(delivery(b""), "q").text() == ""
    assert Message.from_delivery(delivery(b"caf\xe9"), "q").text("latin-1") == "café"
    assert Message.from_delivery(delivery(b"null"), "q").json() is None


# -- 6. retry topology and consumer validation ------------------------------------------


def test_retry_policy() -> None:
    default = Retry()
    assert default.delays == (1.0, 10.0, 60.0)
    assert default.max_attempts == 4
    assert [default.delay_after(n) for n in range(6)] == [None, 1.0, 10.0, 60.0, None, None]
    assert Retry(delays=[2, 3]).delays == (2.0, 3.0)
    assert Retry(delays=[2, 3]) == Retry(delays=(2.0, 3.0))
    none = Retry(delays=())
    assert (none.max_attempts, none.delay_after(1)) == (1, None)


@pytest.mark.parametrize(
    ("delays", "error"),
    [
        ("1,2", TypeError),
        (5, TypeError),
        (b"\x01", TypeError),
        ((0.0,), ValueError),
        ((1.0, 0.0005), ValueError),
        ((2**31 / 1000 + 0.01,), ValueError),
        ((-1.0,), ValueError),
    ],
)
def test_retry_validation(delays: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        Retry(delays=delays)


def test_retry_queue_names_and_arguments() -> None:
    assert delay_ms(1.0) == 1000
    assert delay_ms(0.25) == 250
    assert delay_ms(0.0001) == 1
    assert delay_ms(60) == 60000
    assert retry_queue_name("orders", 1.0) == "orders.retry.1000"
    assert retry_queue_name("orders", 0.5) == "orders.retry.500"
    assert retry_queue_name("orders", 3600) == "orders.retry.3600000"
    assert dead_letter_queue_name("orders") == "orders.dlq"
    assert main_queue_arguments("orders") == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "orders.dlq",
    }
    assert retry_queue_arguments("orders", 10.0) == {
        "x-message-ttl": 10000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "orders",
    }


def test_consumer_decorator_attaches_a_spec_and_returns_the_function() -> None:
    async def handle(msg: Message) -> None:
        pass

    decorated = consumer(
        "orders",
        prefetch=10,
        timeout=5.0,
        concurrency=10,
        retry=Retry(delays=(2.0,)),
        bindings=[Binding("shop", routing_key="order.*", exchange_type="topic")],
        queue_type="quorum",
    )(handle)
    assert decorated is handle
    spec = getattr(handle, SPEC_ATTRIBUTE)
    assert isinstance(spec, ConsumerSpec)
    assert (spec.queue, spec.prefetch, spec.timeout, spec.concurrency) == ("orders", 10, 5.0, 10)
    assert spec.retry == Retry(delays=(2.0,))
    assert spec.bindings == (Binding("shop", "order.*", "topic"),)
    assert spec.queue_type == "quorum"
    assert spec.handler is handle
    assert spec.name.endswith(
        "test_consumer_decorator_attaches_a_spec_and_returns_the_function.<locals>.handle"
    )
    assert ConsumerSpec("q", _handler).retry == Retry()


def test_async_generators_and_non_callables_are_refused_as_handlers() -> None:
    async def agen(msg: Message) -> Any:
        yield

    with pytest.raises(TypeError, match=r"must be an 'async def' or a plain 'def' function"):
        consumer("orders")(agen)
    with pytest.raises(TypeError, match=r"for queue 'orders' must be an 'async def' or a plain"):
        ConsumerSpec("orders", agen)
    with pytest.raises(TypeError, match=r"for queue 'orders' must be callable, not 42"):
        ConsumerSpec("orders", 42)  # type: ignore[arg-type]


def test_plain_def_handlers_are_accepted() -> None:
    def sync(msg: Message) -> None:
        pass

    assert ConsumerSpec("orders", sync).handler is sync
    assert getattr(consumer("orders")(sync), SPEC_ATTRIBUTE).queue == "orders"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prefetch": 0}, ValueError, "prefetch must be an int from 1 to 65535"),
        ({"prefetch": 65536}, ValueError, "prefetch must be an int from 1 to 65535"),
        ({"prefetch": True}, ValueError, "prefetch must be an int"),
        ({"prefetch": 1.5}, ValueError, "prefetch must be an int"),
        ({"concurrency": 0}, ValueError, "concurrency must be an int"),
        (
            {"prefetch": 5, "concurrency": 6},
            ValueError,
            r"concurrency \(6\) cannot exceed prefetch \(5\)",
        ),
        ({"timeout": 0.0}, ValueError, "timeout must be > 0"),
        ({"timeout": -1.0}, ValueError, "timeout must be > 0"),
        (
            {"queue_type": "quorum", "durable": False},
            ValueError,
            "quorum queues are always durable",
        ),
        ({"queue_type": "stream"}, ValueError, "queue_type"),
        ({"delivery_limit": 5}, ValueError, "delivery_limit needs queue_type='quorum'"),
        ({"queue_type": "quorum", "delivery_limit": -1}, ValueError, "delivery_limit must be"),
        ({"queue_type": "quorum", "delivery_limit": True}, ValueError, "delivery_limit must be"),
        (
            {"queue_type": "quorum", "arguments": {"x-delivery-limit": 3}},
            ValueError,
            "give the delivery limit as delivery_limit=",
        ),
        ({"retry": (1.0, 2.0)}, TypeError, "retry must be a strictconsume.Retry"),
        ({"bindings": ["shop"]}, TypeError, "bindings must be Binding objects"),
    ],
)
def test_consumer_spec_validation(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ConsumerSpec("orders", _handler, **kwargs)
    with pytest.raises(error, match=message):
        consumer("orders", **kwargs)(_handler)


@pytest.mark.parametrize(
    ("queue", "message"),
    [
        ("", "queue must be a non-empty string"),
        ("amq.orders", "reserved by the broker"),
        ("amq.gen-123", "reserved by the broker"),
        ("x" * 201, "too long"),
        ("é" * 101, "too long"),  # 202 bytes
    ],
)
def test_queue_name_validation(queue: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConsumerSpec(queue, _handler)


def test_valid_edge_cases_of_consumer_options() -> None:
    assert ConsumerSpec("x" * 200, _handler).queue == "x" * 200
    assert ConsumerSpec("amqorders", _handler).queue == "amqorders"
    assert ConsumerSpec("q", _handler, prefetch=5, concurrency=5).concurrency == 5
    assert ConsumerSpec("q", _handler, prefetch=65535).prefetch == 65535
    # Without a prefetch of its own the App's default applies; checked at start.
    assert ConsumerSpec("q", _handler, concurrency=500).concurrency == 500


def test_binding_validation() -> None:
    with pytest.raises(ValueError, match="a Binding needs an exchange name"):
        Binding("")
    with pytest.raises(ValueError, match="exchange_type must be one of"):
        Binding("shop", exchange_type="bogus")
    assert Binding("shop", exchange_type="x-delayed-message").exchange_type == "x-delayed-message"
    assert Binding("amq.topic", routing_key="#", exchange_type="topic").durable


def test_app_consumer_registry() -> None:
    app = App()

    @app.consumer("orders", prefetch=3)
    async def handle(msg: Message) -> None:
        pass

    assert [spec.queue for spec in app.consumers] == ["orders"]
    assert app.consumers[0].handler is handle

    async def other(msg: Message) -> None:
        pass

    async def plain(msg: Message) -> None:
        pass

    with pytest.raises(ValueError, match="queue 'orders' already has a consumer"):
        app.consumer("orders")(other)
    with pytest.raises(TypeError, match="is not a consumer"):
        app.add_consumer(plain)
    assert repr(app) == "<strictconsume.App consuming [orders]>"


# -- 7. settings ---------------------------------------------------------------------------


def url(host: str = "rabbit", user: str = "alice") -> str:
    return f"amqp://{user}:{PASSWORD}@{host}:5672/shop"


def test_settings_defaults() -> None:
    resolved = resolve_settings({}, {})
    assert resolved == Settings()
    assert resolved.urls == (DEFAULT_URL,)
    assert (resolved.prefetch, resolved.grace_period, resolved.backend) == (64, 30.0, "trio")
    assert (resolved.log_level, resolved.log_format, resolved.consumer_timeout) == (
        "INFO",
        "text",
        1800.0,
    )


def test_settings_precedence_code_then_environment_then_command_line() -> None:
    code = {"prefetch": 10, "grace_period": 5.0, "log_level": "debug", "urls": url("code")}
    assert resolve_settings(code, {}).prefetch == 10
    environ = {
        "STRICTCONSUME_PREFETCH": "20",
        "STRICTCONSUME_BACKEND": "asyncio",
        "STRICTCONSUME_URL": url("env"),
    }
    from_env = resolve_settings(code, environ)
    assert (from_env.prefetch, from_env.grace_period, from_env.backend) == (20, 5.0, "asyncio")
    assert from_env.log_level == "DEBUG"
    assert from_env.urls == (url("env"),)
    cli = {"prefetch": 30, "backend": None, "urls": [url("cli")], "log_format": "json"}
    final = resolve_settings(code, environ, cli)
    assert (final.prefetch, final.backend, final.log_format) == (30, "asyncio", "json")
    assert final.urls == (url("cli"),)
    assert final.parameters[0].host == "cli"
    assert final.parameters[0].password == PASSWORD


def test_strictconsume_url_beats_amqp_url() -> None:
    both = {"STRICTCONSUME_URL": url("primary"), "AMQP_URL": url("fallback")}
    assert resolve_settings({}, both).urls == (url("primary"),)
    assert resolve_settings({}, {"AMQP_URL": url("fallback")}).urls == (url("fallback"),)
    empty = {"STRICTCONSUME_URL": "", "AMQP_URL": url("fallback")}
    assert resolve_settings({}, empty).urls == (url("fallback"),)
    assert resolve_settings({"urls": url("code")}, {"AMQP_URL": url("env")}).urls == (url("env"),)


def test_several_urls_separated_by_commas_or_whitespace() -> None:
    joined = f"{url('n1')},{url('n2')} , {url('n3')}\n{url('n4')}"
    resolved = resolve_settings({}, {"STRICTCONSUME_URL": joined})
    assert [p.host for p in resolved.parameters] == ["n1", "n2", "n3", "n4"]
    assert resolved.redacted_urls == tuple(
        f"amqp://alice:***@{host}:5672/shop" for host in ("n1", "n2", "n3", "n4")
    )
    from_code = resolve_settings({"urls": [url("a"), url("b")]}, {})
    assert from_code.urls == (url("a"), url("b"))


@pytest.mark.parametrize(
    ("code", "environ", "cli", "names"),
    [
        ({}, {"STRICTCONSUME_PREFETCH": "abc"}, {}, "environment variable STRICTCONSUME_PREFETCH"),
        ({}, {"STRICTCONSUME_PREFETCH": "1.5"}, {}, "environment variable STRICTCONSUME_PREFETCH"),
        (
            {},
            {"STRICTCONSUME_PREFETCH": "70000"},
            {},
            "environment variable STRICTCONSUME_PREFETCH",
        ),
        ({}, {}, {"prefetch": 0}, "option --prefetch"),
        ({"prefetch": 0}, {}, {}, r"App\(prefetch=...\)"),
        ({"prefetch": True}, {}, {}, r"App\(prefetch=...\)"),
        ({}, {"STRICTCONSUME_GRACE_PERIOD": "-1"}, {}, "STRICTCONSUME_GRACE_PERIOD"),
        ({}, {"STRICTCONSUME_GRACE_PERIOD": "nan"}, {}, "STRICTCONSUME_GRACE_PERIOD"),
        ({}, {}, {"grace_period": float("inf")}, "option --grace-period"),
        ({}, {"STRICTCONSUME_BACKEND": "curio"}, {}, "STRICTCONSUME_BACKEND"),
        ({}, {}, {"log_level": "LOUD"}, "option --log-level"),
        ({}, {"STRICTCONSUME_LOG_FORMAT": "xml"}, {}, "STRICTCONSUME_LOG_FORMAT"),
        ({}, {"STRICTCONSUME_CONSUMER_TIMEOUT": "soon"}, {}, "STRICTCONSUME_CONSUMER_TIMEOUT"),
    ],
)
def test_bad_values_name_their_source(
    code: dict[str, Any], environ: dict[str, str], cli: dict[str, Any], names: str
) -> None:
    with pytest.raises(SettingsError, match=names) as exc_info:
        resolve_settings(code, environ, cli)
    assert "is not usable" in str(exc_info.value)


def test_a_bad_lower_level_is_reported_even_if_overridden() -> None:
    # Each level is validated where it is given, so a typo never hides.
    with pytest.raises(SettingsError, match="STRICTCONSUME_PREFETCH"):
        resolve_settings({}, {"STRICTCONSUME_PREFETCH": "x"}, {"prefetch": 5})


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("env", f"ftp://alice:{PASSWORD}@rabbit/"),
        ("env", f"amqp://alice:{PASSWORD}@rabbit:99999/"),
        ("env", f"amqp://alice:{PASSWORD}@rabbit/a/b"),
        ("env", f"amqp://alice:{PASSWORD}@rabbit/?heartbeet=5"),
        ("code", f"amqp://alice:{PASSWORD}@rabbit:port/"),
        ("cli", f"{url('ok')},amqp://alice:{PASSWORD}@rabbit/#frag"),
        ("cli", f"amqp://alice:{PASSWORD[:4]}/{PASSWORD[4:]}@rabbit/"),
    ],
)
def test_password_never_in_a_settings_error(source: str, bad: str) -> None:
    code = {"urls": bad} if source == "code" else {}
    environ = {"STRICTCONSUME_URL": bad} if source == "env" else {}
    cli = {"urls": bad.split(",")} if source == "cli" else {}
    with pytest.raises(SettingsError) as exc_info:
        resolve_settings(code, environ, cli)
    error = exc_info.value
    for shown in (str(error), repr(error), repr(error.args)):
        assert PASSWORD not in shown
        assert PASSWORD[4:] not in shown
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert "(hidden: it holds credentials)" in str(error)
    assert "invalid AMQP URL" in str(error)


def test_password_never_in_the_repr_of_settings() -> None:
    resolved = resolve_settings({"urls": [url("n1"), url("n2")]}, {})
    shown = repr(resolved)
    assert PASSWORD not in shown
    assert "amqp://alice:***@n1:5672/shop" in shown
    assert "amqp://alice:***@n2:5672/shop" in shown
    assert "prefetch=64" in shown
    assert PASSWORD not in repr(resolved.parameters)
    assert PASSWORD not in str(resolved)


def test_app_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("STRICTCONSUME_URL", "AMQP_URL", "STRICTCONSUME_PREFETCH"):
        monkeypatch.delenv(variable, raising=False)
    app = App(url(), prefetch=7)
    assert app.settings.prefetch == 7
    monkeypatch.setenv("STRICTCONSUME_PREFETCH", "8")
    assert app.settings.prefetch == 8
    app.configure(prefetch=9)
    assert app.settings.prefetch == 9
    with pytest.raises(SettingsError, match=r"App\(grace_period=...\)"):
        App(grace_period=-5.0)
    with pytest.raises(SettingsError, match="option --prefetch"):
        app.configure(prefetch=0)
    assert app.settings.prefetch == 9  # a refused override changes nothing
    with pytest.raises(TypeError, match="unknown settings: colour"):
        app.configure(colour="blue")


# -- 8. the command line ---------------------------------------------------------------------


_counter = itertools.count()


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Write a throwaway module under a unique name; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for variable in list(os.environ):
        if variable.startswith("STRICTCONSUME_") or variable == "AMQP_URL":
            monkeypatch.delenv(variable)
    created: list[str] = []

    def make(source: str, *, name: str | None = None) -> str:
        module = name or f"sc_cli_mod_{next(_counter)}_{tmp_path.name}".replace("-", "_")
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        created.append(module)
        return module

    yield make
    for module in created:
        sys.modules.pop(module, None)


CONSUMERS_MODULE = """
    import strictconsume

    @strictconsume.consumer("orders", prefetch=5)
    async def handle_order(msg):
        pass

    @strictconsume.consumer("audit")
    async def handle_audit(msg):
        pass

    def helper():
        pass

    helper.__strictconsume_consumer__ = "not a spec"
"""

APP_MODULE = """
    import strictconsume

    app = strictconsume.App("amqp://alice:secret@rabbit/shop", prefetch=3)

    @app.consumer("orders")
    async def handle_order(msg):
        pass

    not_an_app = 42
"""


def test_load_app_by_attribute(make_module: Any) -> None:
    name = make_module(APP_MODULE)
    app = load_app(f"{name}:app")
    assert app is sys.modules[name].app
    assert [spec.queue for spec in app.consumers] == ["orders"]
    assert app.settings.prefetch == 3


def test_load_module_collects_decorated_functions_in_order(make_module: Any) -> None:
    name = make_module(CONSUMERS_MODULE)
    app = load_app(name)
    assert isinstance(app, App)
    assert [spec.queue for spec in app.consumers] == ["orders", "audit"]
    assert app.consumers[0].handler is sys.modules[name].handle_order
    assert app.consumers[0].prefetch == 5


def test_load_module_with_one_app_uses_that_app(make_module: Any) -> None:
    """``python -m strictconsume mod`` on a module whose App registered its handlers
    with ``@app.consumer`` must run that App, with the URL and prefetch its code set,
    not a fresh App with the default localhost URL."""
    name = make_module(APP_MODULE)
    app = load_app(name)
    assert app is sys.modules[name].app
    assert app.settings.urls == ("amqp://alice:secret@rabbit/shop",)


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (None, "sc_cli_does_not_exist_{n}", r"cannot import module 'sc_cli_does_not_exist_\d+'"),
        (None, "sc_cli_missing_pkg_{n}.sub", r"cannot import module 'sc_cli_missing_pkg_\d+\.sub'"),
        ("", ":app", r"':app' names no module; write MODULE or MODULE:ATTR"),
        (APP_MODULE, "{name}:apq", r"module '{name}' has no attribute 'apq'"),
        (APP_MODULE, "{name}:not_an_app", r"{name}:not_an_app is a int, not a strictconsume.App"),
        (APP_MODULE, "{name}:handle_order", r"is a function, not a strictconsume.App"),
        (
            "import strictconsume\nX = 1\n",
            "{name}",
            r"module '{name}' has no functions decorated with @strictconsume.consumer$",
        ),
        (
            "import strictconsume\na = strictconsume.App()\nb = strictconsume.App()\n",
            "{name}",
            r"module '{name}' has no functions decorated with @strictconsume.consumer "
            r"and 2 Apps: name one as {name}:ATTR",
        ),
    ],
)
def test_load_app_usage_errors(
    make_module: Any,
    capsys: pytest.CaptureFixture[str],
    source: str | None,
    target: str,
    message: str,
) -> None:
    n = next(_counter)
    name = make_module(source) if source else ""
    target = target.format(name=name, n=n)
    message = message.format(name=name)
    with pytest.raises(UsageError, match=message):
        load_app(target)
    assert main([target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m strictconsume")
    assert "strictconsume: error: " in err
    assert err.rstrip("\n").splitlines()[-1].startswith("strictconsume: error: ")


def test_a_module_failing_to_import_something_else_is_not_a_usage_error(
    make_module: Any,
) -> None:
    """Only a missing *target* module is a usage error; a missing dependency of it is
    the user's bug and keeps its traceback, even when the names share a prefix."""
    unrelated = make_module("import sc_cli_no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="sc_cli_no_such_dependency_xyz"):
        load_app(unrelated)
    missing = f"sc_cli_dependency_{next(_counter)}"
    prefixed = make_module(f"import {missing}\n", name=f"{missing}_consumers")
    with pytest.raises(ModuleNotFoundError, match=missing):
        load_app(prefixed)


def test_main_returns_1_on_unusable_settings(
    make_module: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = make_module(CONSUMERS_MODULE)
    assert main(["--prefetch", "0", name]) == 1
    err = capsys.readouterr().err
    assert err.startswith("strictconsume: error: option --prefetch: the value 0 is not usable")
    assert main(["--grace-period", "-3", f"{name}"]) == 1
    assert "option --grace-period" in capsys.readouterr().err
    assert main(["--url", f"amqp://alice:{PASSWORD}@rabbit:notaport/", name]) == 1
    err = capsys.readouterr().err
    assert "option --url" in err
    assert PASSWORD not in err
    monkeypatch.setenv("STRICTCONSUME_PREFETCH", "lots")
    assert main([name]) == 1
    assert "environment variable STRICTCONSUME_PREFETCH" in capsys.readouterr().err


@pytest.mark.parametrize("query", ["frame_max=0", "channel_max=0", "heartbeat=70000"])
def test_a_url_option_the_client_refuses_is_one_line_and_exit_1(
    make_module: Any, capsys: pytest.CaptureFixture[str], query: str
) -> None:
    """These passed URL parsing and were refused after every TCP connect: the App
    logged "unexpected error ... reconnecting" with a traceback for ever."""
    name = make_module(CONSUMERS_MODULE)
    assert main(["--url", f"amqp://alice:{PASSWORD}@rabbit/?{query}", name]) == 1
    err = capsys.readouterr().err
    assert err.startswith("strictconsume: error: option --url: ")
    assert f"{query.partition('=')[0]} must be between" in err
    assert err.count("\n") == 1
    assert PASSWORD not in err


def test_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--backend", "curio", "mod"])
    assert exc_info.value.code == 2
    assert "invalid choice: 'curio'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out == f"strictconsume {strictconsume.__version__}\n"


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--url",
        "--prefetch",
        "--grace-period",
        "--backend",
        "--log-level",
        "--log-format",
        "--version",
        "MODULE[:ATTR]",
    ):
        assert option in out


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {}),
        ({"queue_type": "quorum"}, {"x-queue-type": "quorum", "x-delivery-limit": 20}),
        (
            {"queue_type": "quorum", "delivery_limit": 3},
            {"x-queue-type": "quorum", "x-delivery-limit": 3},
        ),
        ({"queue_type": "quorum", "delivery_limit": 0}, {"x-queue-type": "quorum"}),
    ],
)
def test_quorum_queue_arguments(kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    spec = ConsumerSpec("orders", _handler, **kwargs)
    assert queue_arguments(spec) == {**main_queue_arguments("orders"), **expected}


def test_a_broker_consumer_timeout_of_0_means_none() -> None:
    """App(consumer_timeout=0) says the broker's timeout is disabled: no delivery is
    taken back (no warning about a longer handler timeout, no broker-sent cancel taken
    for a timeout); a consumer's own consumer_timeout= wins over the App's."""
    from strictconsume import ConsumerSpec

    async def handle(msg: object) -> None:
        pass

    assert ConsumerSpec("q", handle).broker_consumer_timeout(0.0) is None
    assert ConsumerSpec("q", handle).broker_consumer_timeout(1800.0) == 1800.0
    assert ConsumerSpec("q", handle, consumer_timeout=5.0).broker_consumer_timeout(0.0) == 5.0
