"""``python -m strictconsume dlq list|show|replay|purge QUEUE``: the dead-letter tool.

It works on ``QUEUE.dlq`` (or on QUEUE itself when its name ends in ``.dlq``), with
the App's URL settings (``--url``, ``STRICTCONSUME_URL``, ``AMQP_URL``), through the
project's own AMQP client on one confirmed channel:

1. a passive declare gives the number of dead letters; up to ``--limit`` of them are
   consumed (manual acks, a prefetch that holds them all), then the consumer is
   cancelled, so the tool holds each one unacked while it decides;
2. the filters (``--error-type``, ``--message-id``, ``--since``, ``--until``,
   ``--index``) select some of them;
3. ``replay`` publishes each selected one, one at a time, to the queue it failed in
   (``x-failed-queue``; ``--to`` for another), confirmed and mandatory, and acks the
   dead letter only once the broker confirmed the copy; ``purge`` acks the selected
   ones (after a confirmation, unless ``--yes``); ``list`` and ``show`` print them;
4. everything else is given back (``basic.nack`` with requeue) where it was.

Nothing is lost: a dead letter is acked only after its copy is confirmed, and a
crash or a lost connection before that returns it to the dead-letter queue. Nothing
is doubled, except by a crash in the one moment between a copy's confirm and the
ack of its dead letter: the copy is in the queue and the dead letter back in the
``.dlq``, one duplicate at most, since the next copy is published only after that
ack was sent (the ack and the publish share the channel, whose frames the broker
handles in order). ``dlq list`` after such a crash shows that message still there;
purge it (``--message-id``) rather than replaying it twice.

A replayed copy is a new message: its headers are the dead letter's, byte for byte,
without the reason (``x-error-*``, ``x-failed-*``), the attempt count, the broker's
counts and ``x-death``; it gets ``x-replay-count`` (1 for the first replay),
``x-replayed-at`` (ISO 8601 UTC), ``x-replayed-from`` (the ``.dlq``) and
``x-replayed-error`` (what it had died of), so a handler starts again at attempt 1
and can tell a replay. It is persistent, without ``expiration``, like every copy.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import decimal
import fnmatch
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import attrs

from ._copies import copy_properties as _copy_properties
from ._message import BROKER_COUNT_HEADERS, ORIGINAL_EXCHANGE_HEADER, ORIGINAL_ROUTING_KEY_HEADER
from ._publisher import connect_first
from ._retry import dead_letter_queue_name
from ._settings import SettingsError, resolve_settings
from .amqp import (
    AMQPError,
    Channel,
    ChannelClosed,
    Delivery,
    MessageReturned,
    Properties,
    PublishNacked,
    Timestamp,
)

__all__ = ["DeadLetter", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: Dead letters read at most, by default (each is held in memory while the tool works).
DEFAULT_LIMIT = 10_000
#: Seconds without a delivery after which the dead letters still expected (consumed
#: meanwhile by someone else) are no longer waited for.
IDLE_TIMEOUT = 2.0
#: A dead letter returned this often (its quorum queue's ``x-delivery-count``) is
#: warned about: RabbitMQ 4.0 to 4.2 count the tool's returns, and drop a message of
#: a quorum queue at its delivery limit (20 by default).
RETURNED_OFTEN = 10
#: The headers that say why a message died: a replayed copy goes without them.
REASON_HEADERS = (
    "x-attempt",
    "x-error-type",
    "x-error-message",
    "x-failed-queue",
    "x-failed-at",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    *BROKER_COUNT_HEADERS,
)
REPLAY_COUNT_HEADER = "x-replay-count"


class ToolError(Exception):
    """What the tool could not do, said in one line for the user."""


@attrs.frozen
class DeadLetter:
    """One message of a dead-letter queue, as the tool read it."""

    index: int
    delivery: Delivery
    message_id: str | None
    error_type: str | None
    error_message: str | None
    failed_queue: str | None
    attempt: int | None
    failed_at: datetime.datetime | None

    @classmethod
    def read(cls, index: int, delivery: Delivery) -> DeadLetter:
        """What ``delivery`` says of its death: our ``x-error-*`` headers, or else the
        broker's ``x-death`` (a TTL, a length limit, a quorum delivery limit)."""
        headers = delivery.properties.headers or {}
        death = _first_death(headers)
        error_type = _text(headers.get("x-error-type"))
        error_message = _text(headers.get("x-error-message"))
        if error_type is None and death is not None:
            error_type = f"broker:{_text(death.get('reason')) or 'dead-lettered'}"
            error_message = "dead-lettered by the broker (x-death)"
        failed_queue = _text(headers.get("x-failed-queue"))
        if failed_queue is None and death is not None:
            failed_queue = _text(death.get("queue"))
        failed_at = _time(headers.get("x-failed-at"))
        if failed_at is None and death is not None:
            failed_at = _time(death.get("time"))
        attempt = headers.get("x-attempt")
        return cls(
            index=index,
            delivery=delivery,
            message_id=delivery.properties.message_id,
            error_type=error_type,
            error_message=error_message,
            failed_queue=failed_queue,
            attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
            failed_at=failed_at,
        )

    @property
    def delivery_tag(self) -> int:
        return self.delivery.delivery_tag

    def summary(self) -> dict[str, Any]:
        """The fields ``list`` shows, as JSON values."""
        return {
            "index": self.index,
            "message_id": self.message_id,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "failed_queue": self.failed_queue,
            "attempt": self.attempt,
            "failed_at": _iso(self.failed_at) if self.failed_at else None,
        }

    def whole(self) -> dict[str, Any]:
        """Everything ``show`` shows, as JSON values."""
        properties = self.delivery.properties
        fields = {
            name: getattr(properties, name)
            for name in Properties.attributes()  # pamqp's list, in the wire order
            if name != "headers" and getattr(properties, name) not in (None, "")
        }
        body = self.delivery.body
        try:
            text, encoding = body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(body).decode(), "base64"
        return {
            **self.summary(),
            "redelivered": self.delivery.redelivered,
            "exchange": self.delivery.exchange,
            "routing_key": self.delivery.routing_key,
            "properties": _jsonable(fields),
            "headers": _jsonable(dict(properties.headers or {})),
            "properties_error": self.delivery.properties_error,
            "body_bytes": len(body),
            "body_encoding": encoding,
            "body": text,
        }


def _text(value: object) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _first_death(headers: dict[str, Any]) -> dict[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return None


def _time(value: object) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    text = _text(value)
    if text is None:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _iso(moment: datetime.datetime) -> str:
    utc = moment.astimezone(datetime.UTC)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    """Header and property values as JSON: times in ISO 8601, bytes in base64."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.datetime):
        return _iso(value if value.tzinfo else value.replace(tzinfo=datetime.UTC))
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, decimal.Decimal | Timestamp):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# -- selecting ------------------------------------------------------------------------

_AGO = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_moment(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """``--since``/``--until``: an ISO 8601 time (UTC when it has no offset) or an age
    such as ``30m``, ``2h``, ``1d`` (that long ago)."""
    ago = _AGO.match(text.strip())
    if ago:
        now = now or datetime.datetime.now(datetime.UTC)
        return now - datetime.timedelta(seconds=float(ago.group(1)) * _UNITS[ago.group(2)])
    moment = _time(text.strip())
    if moment is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give ISO 8601 (2026-12-03T08:00:00Z) or an age "
            "such as 30m, 2h or 1d"
        )
    return moment


@attrs.frozen
class Selection:
    """Which dead letters a command works on; every filter given must match."""

    error_types: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()
    indexes: tuple[int, ...] = ()
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.error_types and not any(
            fnmatch.fnmatchcase(letter.error_type or "", pattern) for pattern in self.error_types
        ):
            return False
        if self.message_ids and letter.message_id not in self.message_ids:
            return False
        if self.indexes and letter.index not in self.indexes:
            return False
        if self.since is not None and (letter.failed_at is None or letter.failed_at < self.since):
            return False
        return not (
            self.until is not None and (letter.failed_at is None or letter.failed_at > self.until)
        )

    @property
    def narrowed(self) -> bool:
        return bool(
            self.error_types or self.message_ids or self.indexes or self.since or self.until
        )


# -- replaying ------------------------------------------------------------------------


def replay_properties(
    letter: DeadLetter, dead_letter_queue: str, now: datetime.datetime
) -> Properties:
    """The properties of the copy that replays ``letter``: the dead letter's, without
    the reason of its death and its counts, with a record of the replay."""
    headers = letter.delivery.properties.headers or {}
    replays = headers.get(REPLAY_COUNT_HEADER)
    added: dict[str, Any] = {
        REPLAY_COUNT_HEADER: (replays if isinstance(replays, int) else 0) + 1,
        "x-replayed-at": _iso(now),
        "x-replayed-from": dead_letter_queue,
        "x-replayed-error": ": ".join(
            part for part in (letter.error_type, letter.error_message) if part
        )
        or "unknown",
    }
    death = _first_death(headers)
    if ORIGINAL_ROUTING_KEY_HEADER not in headers and death is not None:
        # dead-lettered by the broker: where it was first published is in x-death
        keys = death.get("routing-keys")
        if isinstance(keys, list) and keys and _text(keys[0]) is not None:
            added[ORIGINAL_EXCHANGE_HEADER] = _text(death.get("exchange")) or ""
            added[ORIGINAL_ROUTING_KEY_HEADER] = _text(keys[0])
    copy = _copy_properties(letter.delivery.properties, added)
    assert copy.headers is not None
    for name in REASON_HEADERS:
        copy.headers.pop(name, None)
    return copy


def replay_target(letter: DeadLetter, dead_letter_queue: str, to: str | None) -> str:
    """Where ``letter`` goes back: ``--to``, else the queue it failed in, else the queue
    whose ``.dlq`` it is in."""
    if to:
        return to
    if letter.failed_queue:
        return letter.failed_queue
    return dead_letter_queue.removesuffix(".dlq")


# -- the commands ---------------------------------------------------------------------


@attrs.define
class Report:
    """What a command did, for the human and the JSON output."""

    command: str
    queue: str
    in_queue: int = 0
    letters: list[DeadLetter] = attrs.Factory(list)
    selected: list[DeadLetter] = attrs.Factory(list)
    done: list[tuple[DeadLetter, str]] = attrs.Factory(list)  # (letter, where / "purged")
    failed: list[tuple[DeadLetter, str]] = attrs.Factory(list)  # (letter, why)
    dry_run: bool = False
    confirmed: bool = True

    @property
    def warnings(self) -> list[str]:
        """What the user should know before reading this queue again."""
        often = [
            letter
            for letter in self.letters
            if letter.delivery_tag not in {done.delivery_tag for done, _ in self.done}
            and _count_header(letter, BROKER_COUNT_HEADERS[0]) >= RETURNED_OFTEN
        ]
        if not often:
            return []
        return [
            f"{len(often)} dead letter(s) of {self.queue} were given back {RETURNED_OFTEN} "
            "times or more (x-delivery-count): RabbitMQ 4.0 to 4.2 drop a quorum queue's "
            "message at its delivery limit (20 by default); replay or purge them rather "
            "than reading them again"
        ]


def _count_header(letter: DeadLetter, name: str) -> int:
    value = (letter.delivery.properties.headers or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def _read(ch: Channel, queue: str, limit: int) -> tuple[int, list[DeadLetter]]:
    """Consume up to ``limit`` dead letters of ``queue`` and hold them unacked."""
    try:
        ok = await ch.queue_declare(queue, passive=True)
    except ChannelClosed as exc:
        if exc.reply_code == 404:
            raise ToolError(
                f"queue {queue!r} does not exist: name the consumer's queue (its dead "
                "letters are in QUEUE.dlq) or the .dlq itself"
            ) from None
        raise
    wanted = min(ok.message_count, limit)
    letters: list[DeadLetter] = []
    if wanted == 0:
        return ok.message_count, letters
    await ch.qos(min(wanted, 65535))
    async with ch.consume(queue) as consumer:
        while len(letters) < wanted:
            delivery: Delivery | None = None
            with anyio.move_on_after(IDLE_TIMEOUT):
                delivery = await consumer.__anext__()
            if delivery is None:
                break  # no more: someone else consumed the rest meanwhile
            letters.append(DeadLetter.read(len(letters) + 1, delivery))
    return ok.message_count, letters


async def run_command(
    command: str,
    urls: Sequence[str],
    queue: str,
    selection: Selection,
    *,
    limit: int = DEFAULT_LIMIT,
    to: str | None = None,
    dry_run: bool = False,
    confirm: Callable[[Report], bool] | None = None,
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
) -> Report:
    """Run ``command`` (list, show, replay, purge) on the dead letters of ``queue``.

    ``confirm`` is asked before a purge that is not a dry run (None: no question).

    Raises:
        ToolError: the queue does not exist, or the broker cannot be reached.
    """
    dlq = queue if queue.endswith(".dlq") else dead_letter_queue_name(queue)
    report = Report(command, dlq, dry_run=dry_run)
    try:
        async with connect_first(urls) as conn, conn.channel(confirms=True) as ch:
            report.in_queue, report.letters = await _read(ch, dlq, limit)
            report.selected = [letter for letter in report.letters if selection.matches(letter)]
            held = {letter.delivery_tag for letter in report.letters}
            try:
                if command == "purge" and report.selected and not dry_run and confirm:
                    report.confirmed = await anyio.to_thread.run_sync(confirm, report)
                if command in ("replay", "purge") and dry_run:
                    for letter in report.selected:
                        where = "purged" if command == "purge" else replay_target(letter, dlq, to)
                        report.done.append((letter, where))
                elif command in ("replay", "purge") and report.confirmed:
                    await _settle(ch, command, dlq, report, held, to, now)
            finally:
                if held and ch.is_open:
                    with anyio.CancelScope(shield=True):
                        # back in their order: a classic queue puts each one back
                        # where it was; a quorum queue redelivers returns first, in
                        # the order they were returned
                        for tag in sorted(held):
                            await ch.nack(tag, requeue=True)
    except AMQPError as exc:
        raise ToolError(f"{_redacted(urls)}: {exc}") from exc
    except OSError as exc:
        raise ToolError(f"cannot reach {_redacted(urls)}: {exc}") from exc
    return report


def _redacted(urls: Sequence[str]) -> str:
    from .amqp import redact_url

    return ", ".join(redact_url(url) for url in urls)


async def _settle(
    ch: Channel,
    command: str,
    dlq: str,
    report: Report,
    held: set[int],
    to: str | None,
    now: Callable[[], datetime.datetime],
) -> None:
    for letter in report.selected:
        if command == "purge":
            await ch.ack(letter.delivery_tag)
            held.discard(letter.delivery_tag)
            report.done.append((letter, "purged"))
            continue
        target = replay_target(letter, dlq, to)
        if letter.delivery.properties_error is not None:
            report.failed.append(
                (letter, f"its properties cannot be read: {letter.delivery.properties_error}")
            )
            continue
        try:
            properties = replay_properties(letter, dlq, now())
            await ch.publish(
                letter.delivery.body, routing_key=target, properties=properties, mandatory=True
            )
        except MessageReturned:
            report.failed.append((letter, f"no queue {target!r} took it (does it exist?)"))
            continue
        except PublishNacked:
            report.failed.append((letter, f"the broker refused the copy to {target!r}"))
            continue
        except (ValueError, TypeError) as exc:  # a header our codec cannot write
            report.failed.append((letter, f"it cannot be copied: {exc}"))
            continue
        # confirmed: only now is the dead letter let go
        await ch.ack(letter.delivery_tag)
        held.discard(letter.delivery_tag)
        report.done.append((letter, target))


# -- output ---------------------------------------------------------------------------


def _one_line(text: str | None, width: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_human(report: Report) -> str:
    lines: list[str] = []
    more = report.in_queue - len(report.letters)
    head = f"{report.queue}: {report.in_queue} dead letter(s)"
    if more > 0:
        head += f", the first {len(report.letters)} read (--limit)"
    head += f", {len(report.selected)} selected"
    lines.append(head)
    if report.command == "show":
        for letter in report.selected:
            lines += ["", *_render_whole(letter)]
        return "\n".join(lines)
    if report.command == "list" and report.selected:
        rows = [("#", "message_id", "failed_at", "attempt", "failed in", "error")]
        for letter in report.selected:
            error = ": ".join(p for p in (letter.error_type, letter.error_message) if p)
            rows.append(
                (
                    str(letter.index),
                    letter.message_id or "-",
                    _iso(letter.failed_at) if letter.failed_at else "-",
                    str(letter.attempt) if letter.attempt is not None else "-",
                    letter.failed_queue or "-",
                    _one_line(error),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            lines.append(
                "  "
                + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                + "  "
                + row[5]
            )
    if report.command in ("replay", "purge"):
        if not report.confirmed:
            lines.append("not confirmed: nothing purged")
        verb = {"replay": "replayed", "purge": "purged"}[report.command]
        if report.dry_run:
            verb = f"would be {verb} (--dry-run: nothing changed)"
        for letter, where in report.done:
            target = "" if where == "purged" else f" to {where!r}"
            lines.append(f"  #{letter.index} {letter.message_id or '-'}: {verb}{target}")
        for letter, why in report.failed:
            lines.append(
                f"  #{letter.index} {letter.message_id or '-'}: left in {report.queue}: {why}"
            )
        lines.append(f"{len(report.done)} {verb}, {len(report.failed)} failed")
    return "\n".join(lines)


def _render_whole(letter: DeadLetter) -> list[str]:
    data = letter.whole()
    lines = [f"dead letter #{letter.index}"]
    for key in (
        "message_id",
        "error_type",
        "error_message",
        "failed_queue",
        "attempt",
        "failed_at",
        "redelivered",
        "exchange",
        "routing_key",
    ):
        lines.append(f"  {key}: {data[key]}")
    if data["properties_error"]:
        lines.append(f"  properties_error: {data['properties_error']}")
    lines.append("  properties:")
    for key, value in data["properties"].items():
        lines.append(f"    {key}: {json.dumps(value)}")
    lines.append("  headers:")
    for key, value in data["headers"].items():
        lines.append(f"    {key}: {json.dumps(value)}")
    lines.append(f"  body ({data['body_bytes']} bytes, {data['body_encoding']}):")
    lines += [f"    {line}" for line in (data["body"].splitlines() or [""])]
    return lines


def render_json(report: Report) -> str:
    if report.command in ("list", "show"):
        method = DeadLetter.summary if report.command == "list" else DeadLetter.whole
        letters = [method(letter) for letter in report.selected]
        return json.dumps(
            {
                "queue": report.queue,
                "in_queue": report.in_queue,
                "read": len(report.letters),
                "selected": letters,
                "warnings": report.warnings,
            },
            indent=None,
        )
    return json.dumps(
        {
            "queue": report.queue,
            "command": report.command,
            "dry_run": report.dry_run,
            "confirmed": report.confirmed,
            "in_queue": report.in_queue,
            "read": len(report.letters),
            "selected": len(report.selected),
            "done": [
                {**letter.summary(), **({} if where == "purged" else {"to": where})}
                for letter, where in report.done
            ],
            "failed": [{**letter.summary(), "reason": why} for letter, why in report.failed],
            "warnings": report.warnings,
        }
    )


# -- the command line -----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "queue",
        metavar="QUEUE",
        help="the consumer's queue (its dead letters are in QUEUE.dlq), or a .dlq",
    )
    common.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="the broker (repeat for a cluster's nodes; env STRICTCONSUME_URL or AMQP_URL)",
    )
    common.add_argument("--json", action="store_true", help="JSON on stdout, for scripts")
    common.add_argument(
        "--error-type",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only dead letters whose x-error-type matches (shell pattern, e.g. "
        "'shop.*'; broker dead-lettering is 'broker:REASON'); repeatable",
    )
    common.add_argument(
        "--message-id",
        action="append",
        default=[],
        metavar="ID",
        help="only this message id; repeatable",
    )
    common.add_argument(
        "--index",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="only the N-th dead letter as `list` numbers them; repeatable",
    )
    common.add_argument(
        "--since",
        type=parse_moment,
        metavar="TIME",
        help="only those that failed at or after TIME (ISO 8601, or an age: 2h)",
    )
    common.add_argument(
        "--until",
        type=parse_moment,
        metavar="TIME",
        help="only those that failed at or before TIME",
    )
    common.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"read at most N dead letters from the head ({DEFAULT_LIMIT})",
    )
    parser = argparse.ArgumentParser(
        prog="python -m strictconsume dlq",
        description="Inspect, replay or purge the dead letters of a queue. Messages not "
        "selected are given back where they were; a replayed one is acked only once its "
        "copy is confirmed.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", parents=[common], help="one line per dead letter")
    commands.add_parser("show", parents=[common], help="the selected dead letters, whole")
    replay = commands.add_parser(
        "replay", parents=[common], help="publish them again to the queue they failed in"
    )
    replay.add_argument("--to", metavar="QUEUE", help="replay to this queue instead")
    replay.add_argument("--dry-run", action="store_true", help="say what would be done")
    purge = commands.add_parser("purge", parents=[common], help="delete them")
    purge.add_argument("--yes", action="store_true", help="do not ask for a confirmation")
    purge.add_argument("--dry-run", action="store_true", help="say what would be done")
    return parser


def _ask(report: Report) -> bool:
    which = (
        "every dead letter read"
        if len(report.selected) == len(report.letters)
        else ("the selected dead letters")
    )
    print(
        f"purge {len(report.selected)} message(s) from {report.queue!r} ({which})? "
        "This cannot be undone. [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def main(argv: Sequence[str]) -> int:
    """Run ``python -m strictconsume dlq ARGS``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    if not 1 <= args.limit <= 65535:  # all held at once: a prefetch is a short
        parser.error("--limit must be from 1 to 65535")
    try:
        settings = resolve_settings({}, os.environ, {"urls": args.url})
    except SettingsError as exc:
        print(f"strictconsume dlq: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    selection = Selection(
        error_types=tuple(args.error_type),
        message_ids=tuple(args.message_id),
        indexes=tuple(args.index),
        since=args.since,
        until=args.until,
    )
    dry_run = getattr(args, "dry_run", False)
    confirm = None if getattr(args, "yes", False) else _ask

    async def run() -> Report:
        return await run_command(
            args.command,
            settings.urls,
            args.queue,
            selection,
            limit=args.limit,
            to=getattr(args, "to", None),
            dry_run=dry_run,
            confirm=confirm,
        )

    try:
        report = anyio.run(run, backend=settings.backend)
    except ToolError as exc:
        print(f"strictconsume dlq: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(render_json(report) if args.json else render_human(report))
    for warning in report.warnings:
        print(f"strictconsume dlq: warning: {warning}", file=sys.stderr)
    if report.failed or not report.confirmed:
        return EXIT_FAILED
    return EXIT_OK
