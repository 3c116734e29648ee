"""``python -m strictconsume dlq``: the dead-letter tool (``_dlq_tool.py``).

Without a broker: reading the reason of a death (ours and the broker's ``x-death``),
the filters, the times, the replayed copy's headers and the output. Against the real
broker, with pika as the oracle: dead letters made by a real App (rejects, failures)
listed, shown, replayed (all, by filter, ``--to`` another queue, to a queue that does
not exist) and purged (confirmed or not, ``--dry-run``), everything not selected left
in place in its order; the CLI as a real process (``--json``, the purge prompt); and
a replay killed with SIGKILL half-way: every message is in the queue or still in the
``.dlq``, at most one in both.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pika
import pytest

import strictconsume as sc
from strictconsume._dlq_tool import (
    DeadLetter,
    Report,
    Selection,
    parse_moment,
    render_human,
    render_json,
    replay_properties,
    run_command,
)
from strictconsume.amqp import Properties
from strictconsume.amqp._protocol import Delivery

from ..amqp.oracle import Oracle, get_from, pika_channel
from ..conftest import REPO
from .polling import wait_for_count

NOW = datetime.datetime(2026, 12, 3, 9, 0, tzinfo=datetime.UTC)


def _delivery(
    headers: dict[str, Any] | None, message_id: str | None = "m-1", tag: int = 1
) -> Delivery:
    return Delivery(
        channel_id=1,
        consumer_tag="t",
        delivery_tag=tag,
        redelivered=False,
        exchange="",
        routing_key="orders.dlq",
        properties=Properties(headers=headers, message_id=message_id, content_type="text/plain"),
        body=b"payload",
    )


OURS = {
    "x-error-type": "shop.PaymentError",
    "x-error-message": "gateway down",
    "x-failed-queue": "orders",
    "x-attempt": 4,
    "x-failed-at": "2026-12-03T08:30:00.000Z",
    "x-original-exchange": "shop",
    "x-original-routing-key": "order.created",
    "tenant": "acme",
}
BROKERS = {
    "x-death": [
        {
            "count": 1,
            "reason": "expired",
            "queue": "orders",
            "time": datetime.datetime(2026, 12, 3, 7, 0, tzinfo=datetime.UTC),
            "exchange": "shop",
            "routing-keys": ["order.created"],
        }
    ],
    "x-first-death-reason": "expired",
    "x-delivery-count": 3,
}


def test_the_reason_is_read_from_our_headers_or_the_brokers_x_death() -> None:
    ours = DeadLetter.read(1, _delivery(OURS))
    assert (ours.error_type, ours.error_message, ours.failed_queue, ours.attempt) == (
        "shop.PaymentError",
        "gateway down",
        "orders",
        4,
    )
    assert ours.failed_at == datetime.datetime(2026, 12, 3, 8, 30, tzinfo=datetime.UTC)
    brokers = DeadLetter.read(2, _delivery(BROKERS, message_id=None))
    assert (brokers.error_type, brokers.failed_queue, brokers.attempt) == (
        "broker:expired",
        "orders",
        None,
    )
    assert brokers.failed_at == datetime.datetime(2026, 12, 3, 7, 0, tzinfo=datetime.UTC)
    bare = DeadLetter.read(3, _delivery(None))
    assert (bare.error_type, bare.failed_queue, bare.failed_at) == (None, None, None)


def test_times_are_iso_or_an_age() -> None:
    assert parse_moment("2026-12-03T08:00:00Z") == datetime.datetime(
        2026, 12, 3, 8, 0, tzinfo=datetime.UTC
    )
    assert parse_moment("2026-12-03T08:00:00") == datetime.datetime(
        2026, 12, 3, 8, 0, tzinfo=datetime.UTC
    )
    assert parse_moment("90m", now=NOW) == NOW - datetime.timedelta(minutes=90)
    assert parse_moment("1d", now=NOW) == NOW - datetime.timedelta(days=1)
    with pytest.raises(Exception, match=r"'yesterday' is not a time.*ISO 8601.*2h"):
        parse_moment("yesterday")


def test_every_filter_given_must_match() -> None:
    ours = DeadLetter.read(1, _delivery(OURS, message_id="a"))
    brokers = DeadLetter.read(2, _delivery(BROKERS, message_id="b"))
    letters = [ours, brokers]

    def picked(selection: Selection) -> list[int]:
        return [letter.index for letter in letters if selection.matches(letter)]

    assert picked(Selection()) == [1, 2]
    assert picked(Selection(error_types=("shop.*",))) == [1]
    assert picked(Selection(error_types=("broker:*", "nope"))) == [2]
    assert picked(Selection(message_ids=("b",))) == [2]
    assert picked(Selection(indexes=(1,))) == [1]
    at_745 = datetime.datetime(2026, 12, 3, 7, 45, tzinfo=datetime.UTC)
    assert picked(Selection(since=at_745)) == [1]
    assert picked(Selection(until=at_745)) == [2]
    assert picked(Selection(error_types=("shop.*",), message_ids=("b",))) == []


def test_a_replayed_copy_starts_afresh_and_records_the_replay() -> None:
    copy = replay_properties(DeadLetter.read(1, _delivery(OURS)), "orders.dlq", NOW)
    assert copy.headers == {
        "x-original-exchange": "shop",
        "x-original-routing-key": "order.created",
        "tenant": "acme",
        "x-replay-count": 1,
        "x-replayed-at": "2026-12-03T09:00:00.000Z",
        "x-replayed-from": "orders.dlq",
        "x-replayed-error": "shop.PaymentError: gateway down",
    }
    assert (copy.message_id, copy.content_type, copy.delivery_mode) == ("m-1", "text/plain", 2)
    again = replay_properties(
        DeadLetter.read(1, _delivery({**OURS, "x-replay-count": 1})), "orders.dlq", NOW
    )
    assert again.headers is not None
    assert again.headers["x-replay-count"] == 2
    brokers = replay_properties(DeadLetter.read(1, _delivery(BROKERS)), "orders.dlq", NOW)
    assert brokers.headers == {
        "x-original-exchange": "shop",  # from x-death: where it was first published
        "x-original-routing-key": "order.created",
        "x-replay-count": 1,
        "x-replayed-at": "2026-12-03T09:00:00.000Z",
        "x-replayed-from": "orders.dlq",
        "x-replayed-error": "broker:expired: dead-lettered by the broker (x-death)",
    }


def test_dead_letters_given_back_often_are_warned_about() -> None:
    often = DeadLetter.read(1, _delivery({**OURS, "x-delivery-count": 12}, tag=1))
    rarely = DeadLetter.read(2, _delivery({**OURS, "x-delivery-count": 9}, tag=2))
    report = Report("list", "orders.dlq", in_queue=2, letters=[often, rarely])
    (warning,) = report.warnings
    assert warning.startswith("1 dead letter(s) of orders.dlq were given back 10 times")
    assert "delivery limit" in warning
    assert json.loads(render_json(report))["warnings"] == [warning]
    report.done.append((often, "orders"))  # replayed: gone from the queue
    assert report.warnings == []


def test_the_output_for_people_and_for_scripts() -> None:
    letters = [
        DeadLetter.read(1, _delivery(OURS, message_id="a", tag=1)),
        DeadLetter.read(2, _delivery(BROKERS, message_id="b", tag=2)),
    ]
    report = Report("list", "orders.dlq", in_queue=5, letters=letters, selected=letters[:1])
    text = render_human(report)
    assert text.splitlines()[0] == (
        "orders.dlq: 5 dead letter(s), the first 2 read (--limit), 1 selected"
    )
    assert "shop.PaymentError: gateway down" in text
    assert "2026-12-03T08:30:00.000Z" in text
    data = json.loads(render_json(report))
    assert data["selected"] == [
        {
            "index": 1,
            "message_id": "a",
            "error_type": "shop.PaymentError",
            "error_message": "gateway down",
            "failed_queue": "orders",
            "attempt": 4,
            "failed_at": "2026-12-03T08:30:00.000Z",
        }
    ]
    assert data["warnings"] == []
    show = Report("show", "orders.dlq", in_queue=2, letters=letters, selected=letters[1:])
    whole = json.loads(render_json(show))["selected"][0]
    assert whole["headers"]["x-death"][0]["time"] == "2026-12-03T07:00:00.000Z"
    assert (whole["body"], whole["body_encoding"]) == ("payload", "utf-8")
    assert 'x-first-death-reason: "expired"' in render_human(show)


# -- against the broker ---------------------------------------------------------------


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    name = f"sc-dlq-{uuid.uuid4().hex[:12]}"
    yield name
    oracle = Oracle(broker_url)
    for suffix in ("", ".dlq", ".other"):
        oracle.delete_now(name + suffix)


async def _dead_letters(broker_url: str, queue: str, queue_type: str = "classic") -> None:
    """Six dead letters in ``queue.dlq``, made by a real App: m1..m6, m2 and m5
    failing with ValueError, the others rejected."""
    app = sc.App(url=broker_url, grace_period=1.0)

    @app.consumer(
        queue,
        timeout=5.0,
        retry=sc.Retry(delays=()),
        queue_type="quorum" if queue_type == "quorum" else "classic",
    )
    async def handle(msg: sc.Message) -> None:
        if msg.message_id in ("m2", "m5"):
            raise ValueError("bad value")
        raise sc.Reject(f"rejected {msg.message_id}")

    oracle = Oracle(broker_url)
    async with app.running():
        for n in range(1, 7):  # one at a time: the .dlq keeps their order
            await oracle.publish(queue, f"body {n}".encode(), message_id=f"m{n}", headers={"n": n})
            await wait_for_count(oracle, f"{queue}.dlq", n)


def _drain(url: str, queue: str) -> list[tuple[str, dict[str, Any], bytes]]:
    """Every message of ``queue`` (taken out): (message id, headers, body), in order."""
    found = []
    with pika_channel(url) as ch:
        while (message := get_from(ch, queue)) is not None:
            found.append((message.properties.message_id, message.headers or {}, message.body))
    return found


def _ids(url: str, queue: str) -> list[str]:
    return [message_id for message_id, _, _ in _drain(url, queue)]


pytestmark = pytest.mark.anyio


@pytest.mark.broker
async def test_list_and_show_leave_every_dead_letter_in_its_place(
    broker_url: str, queue: str
) -> None:
    await _dead_letters(broker_url, queue)
    report = await run_command("list", [broker_url], queue, Selection())
    assert report.in_queue == 6
    assert [letter.message_id for letter in report.selected] == [f"m{n}" for n in range(1, 7)]
    m2 = report.selected[1]
    assert (m2.error_type, m2.error_message, m2.failed_queue, m2.attempt) == (
        "ValueError",
        "bad value",
        queue,
        1,
    )
    assert m2.failed_at is not None
    assert abs((datetime.datetime.now(datetime.UTC) - m2.failed_at).total_seconds()) < 60
    shown = await run_command(
        "show", [broker_url], f"{queue}.dlq", Selection(error_types=("ValueError",))
    )
    assert [letter.message_id for letter in shown.selected] == ["m2", "m5"]
    assert shown.selected[1].whole()["body"] == "body 5"
    assert shown.selected[1].whole()["headers"]["n"] == 5
    # nothing moved: the same six, in the same order
    assert await anyio.to_thread.run_sync(_ids, broker_url, f"{queue}.dlq") == [
        f"m{n}" for n in range(1, 7)
    ]


@pytest.mark.broker
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_replay_of_the_selected_ones_to_where_they_failed(
    broker_url: str, queue: str, queue_type: str
) -> None:
    await _dead_letters(broker_url, queue, queue_type)
    dry = await run_command(
        "replay", [broker_url], queue, Selection(error_types=("ValueError",)), dry_run=True
    )
    assert [(letter.message_id, where) for letter, where in dry.done] == [
        ("m2", queue),
        ("m5", queue),
    ]
    oracle = Oracle(broker_url)
    assert await oracle.message_count(queue) == 0
    report = await run_command(
        "replay", [broker_url], queue, Selection(error_types=("ValueError",))
    )
    assert [letter.message_id for letter, _ in report.done] == ["m2", "m5"]
    assert report.failed == []
    replayed = await anyio.to_thread.run_sync(_drain, broker_url, queue)
    assert [(message_id, body) for message_id, _, body in replayed] == [
        ("m2", b"body 2"),
        ("m5", b"body 5"),
    ]
    headers = replayed[0][1]
    assert headers["n"] == 2  # the publisher's own header, kept
    assert headers["x-replay-count"] == 1
    assert headers["x-replayed-from"] == f"{queue}.dlq"
    assert headers["x-replayed-error"] == "ValueError: bad value"
    assert not {"x-error-type", "x-error-message", "x-attempt", "x-failed-at"} & set(headers)
    left = await anyio.to_thread.run_sync(_ids, broker_url, f"{queue}.dlq")
    assert left == ["m1", "m3", "m4", "m6"]


@pytest.mark.broker
async def test_replay_to_another_queue_and_to_one_that_does_not_exist(
    broker_url: str, queue: str
) -> None:
    await _dead_letters(broker_url, queue)
    oracle = Oracle(broker_url)
    await oracle.declare(f"{queue}.other")
    moved = await run_command(
        "replay", [broker_url], queue, Selection(message_ids=("m1",)), to=f"{queue}.other"
    )
    assert [(letter.message_id, where) for letter, where in moved.done] == [
        ("m1", f"{queue}.other")
    ]
    assert await anyio.to_thread.run_sync(_ids, broker_url, f"{queue}.other") == ["m1"]
    lost = await run_command(
        "replay", [broker_url], queue, Selection(indexes=(1, 2)), to=f"{queue}.nowhere"
    )
    assert lost.done == []
    assert [(letter.message_id, why) for letter, why in lost.failed] == [
        ("m2", f"no queue '{queue}.nowhere' took it (does it exist?)"),
        ("m3", f"no queue '{queue}.nowhere' took it (does it exist?)"),
    ]
    left = await anyio.to_thread.run_sync(_ids, broker_url, f"{queue}.dlq")
    assert left == ["m2", "m3", "m4", "m5", "m6"]


@pytest.mark.broker
async def test_purge_asks_and_deletes_only_what_was_selected(broker_url: str, queue: str) -> None:
    await _dead_letters(broker_url, queue)
    oracle = Oracle(broker_url)
    asked: list[int] = []

    def refuse(report: Report) -> bool:
        asked.append(len(report.selected))
        return False

    refused = await run_command(
        "purge", [broker_url], queue, Selection(message_ids=("m3", "m4")), confirm=refuse
    )
    assert (asked, refused.confirmed, refused.done) == ([2], False, [])
    dry = await run_command("purge", [broker_url], queue, Selection(), dry_run=True)
    assert len(dry.done) == 6
    assert await oracle.message_count(f"{queue}.dlq") == 6
    purged = await run_command(
        "purge", [broker_url], queue, Selection(message_ids=("m3", "m4")), confirm=lambda r: True
    )
    assert [letter.message_id for letter, _ in purged.done] == ["m3", "m4"]
    left = await anyio.to_thread.run_sync(_ids, broker_url, f"{queue}.dlq")
    assert left == ["m1", "m2", "m5", "m6"]


@pytest.mark.broker
async def test_a_queue_that_does_not_exist_is_a_clear_error(broker_url: str) -> None:
    from strictconsume._dlq_tool import ToolError

    with pytest.raises(ToolError, match=r"queue 'sc-dlq-missing\.dlq' does not exist"):
        await run_command("list", [broker_url], "sc-dlq-missing", Selection())


# -- as a process ---------------------------------------------------------------------


def _cli(url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("AMQP_URL", "STRICTCONSUME_URL")}
    return subprocess.run(
        [sys.executable, "-m", "strictconsume", "dlq", *args, "--url", url],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=environ,
        check=False,
    )


@pytest.mark.broker
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_command_line(broker_url: str, queue: str) -> None:
    await _dead_letters(broker_url, queue)
    listed = await anyio.to_thread.run_sync(
        lambda: _cli(broker_url, "list", queue, "--json", "--error-type", "strictconsume.*")
    )
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert (data["queue"], data["in_queue"], data["read"]) == (f"{queue}.dlq", 6, 6)
    assert [m["message_id"] for m in data["selected"]] == ["m1", "m3", "m4", "m6"]
    assert data["selected"][0]["error_message"] == "rejected m1"
    human = await anyio.to_thread.run_sync(lambda: _cli(broker_url, "list", queue))
    assert human.returncode == 0
    assert "strictconsume.Reject: rejected m1" in human.stdout
    refused = await anyio.to_thread.run_sync(
        lambda: _cli(broker_url, "purge", queue, "--message-id", "m1", stdin="n\n")
    )
    assert refused.returncode == 1
    assert "purge 1 message(s) from" in refused.stderr
    assert "not confirmed: nothing purged" in refused.stdout
    purged = await anyio.to_thread.run_sync(
        lambda: _cli(broker_url, "purge", queue, "--message-id", "m1", stdin="y\n")
    )
    assert purged.returncode == 0, purged.stderr
    assert "1 purged, 0 failed" in purged.stdout
    assert await Oracle(broker_url).message_count(f"{queue}.dlq") == 5
    missing = await anyio.to_thread.run_sync(lambda: _cli(broker_url, "list", f"{queue}-nope"))
    assert missing.returncode == 1
    assert f"queue '{queue}-nope.dlq' does not exist" in missing.stderr
    usage = await anyio.to_thread.run_sync(lambda: _cli(broker_url, "list", queue, "--since", "x"))
    assert usage.returncode == 2
    assert "is not a time" in usage.stderr


def _fill(url: str, queue: str, n: int) -> None:
    with pika_channel(url) as ch:
        ch.queue_declare(queue, durable=True)
        ch.queue_declare(f"{queue}.dlq", durable=True)
        ch.confirm_delivery()
        for i in range(n):
            properties = pika.BasicProperties(
                message_id=f"d{i}",
                delivery_mode=2,
                headers={"x-error-type": "ValueError", "x-failed-queue": queue, "x-attempt": 4},
            )
            ch.basic_publish("", f"{queue}.dlq", f"{i}".encode(), properties, mandatory=True)


def _count(url: str, queue: str) -> int:
    with pika_channel(url) as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)


@pytest.mark.broker
def test_a_replay_killed_half_way_loses_nothing_and_doubles_at_most_one(
    broker_url: str, queue: str, tmp_path: Path
) -> None:
    n = 2000
    _fill(broker_url, queue, n)
    environ = {k: v for k, v in os.environ.items() if k not in ("AMQP_URL", "STRICTCONSUME_URL")}
    log = tmp_path / "replay.log"
    with log.open("wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strictconsume", "dlq", "replay", queue, "--url", broker_url],
            cwd=REPO,
            env=environ,
            stdout=output,
            stderr=output,
        )
    try:
        deadline = time.monotonic() + 30
        while _count(broker_url, queue) < 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the replay did not get going"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    # the broker requeues what the dead connection held
    deadline = time.monotonic() + 10
    while _count(broker_url, queue) + _count(broker_url, f"{queue}.dlq") < n:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    replayed = _ids(broker_url, queue)
    left = _ids(broker_url, f"{queue}.dlq")
    assert 200 <= len(replayed) < n, "killed half-way"
    assert len(set(replayed)) == len(replayed)
    assert set(replayed) | set(left) == {f"d{i}" for i in range(n)}  # nothing lost
    doubled = set(replayed) & set(left)
    assert len(doubled) <= 1
    print(f"replayed {len(replayed)} of {n} before SIGKILL; {len(doubled)} in both queues")
