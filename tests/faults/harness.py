"""The no-loss invariant under faults: a load, the consumer processes, the check.

A :class:`FaultRun` publishes a load of messages with unique ids (confirmed and
persistent, with pika), runs ``python -m strictconsume tests.faults.fault_app:app``
against a private node through ``tests.processes.Harness``, and lets a test inject
its fault while the load is being handled. At the end, :meth:`FaultRun.check` waits
until everything is settled and checks the invariant of design section 9:

- every published id was either handled to the end (a run with outcome ``ok`` in the
  app's SQLite record) or sits in ``<queue>.dlq`` with its reason in the headers
  (``x-error-type``, ``x-failed-queue``, ``x-attempt``, ``x-error-message``), read
  back with pika's basic.get; and exactly the ids that asked for it are dead-lettered;
- nothing is left in the queue or its retry queues, and nothing is unacked
  (``rabbitmqctl list_queues``);
- every run that never ended or was cancelled (a killed process, a broken connection,
  a grace period that ran out) is followed by a redelivered run of the same id;
- ``lost`` (published ids neither finished nor dead-lettered) is 0. Duplicates (an id
  finished or dead-lettered more than once, or both) are counted, not forbidden:
  delivery is at least once, and a handler that finished before its ack was lost
  runs again.

Each check ends with a :class:`FaultReport`: printed, and appended as one JSON line
to the file named by ``STRICTCONSUME_FAULT_REPORT`` when that is set.

Times are wall-clock (``time.time()``) throughout, because they are compared with the
times in the consumer's JSON log (``--log-format json``) and in the SQLite record.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import random
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..amqp.oracle import get_from, pika_channel
from ..processes import Consumer, Harness, Node, declare, list_queues, publish
from .fault_app import SCHEMA

__all__ = [
    "APP",
    "DeadLetter",
    "Event",
    "FaultReport",
    "FaultRun",
    "Run",
    "beam_pid",
    "connection_lost_at",
    "events",
    "failures",
    "load",
    "log_time",
    "url_with_query",
]

APP = "tests.faults.fault_app:app"
#: Seconds within which `rabbitmqctl list_queues` shows a quorum queue's figures of
#: now: two of its ticks (`quorum_tick_interval`, 5 s by default), and some slack.
QUORUM_FIGURES_REFRESHED = 12.0
#: The app's retry policy in these tests: three attempts, then the dead-letter queue.
RETRY_DELAYS = (0.2, 0.5)
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1
FAIL_TYPE = "tests.faults.fault_app.InjectedFailure"
REJECT_TYPE = "strictconsume.Reject"
#: Log lines that must never appear, whatever the fault.
BAD_LOG = ("Traceback", "unexpected error", "PRECONDITION_FAILED", "unknown delivery tag")


# -- the record and the log ------------------------------------------------------------


@attrs.frozen
class Run:
    """One handler run, as the fault app recorded it (see ``fault_app.SCHEMA``)."""

    run: int
    id: str
    kind: str
    pid: int
    attempt: int
    redelivered: bool
    started: float
    ended: float | None
    outcome: str | None


@attrs.frozen
class DeadLetter:
    id: str
    headers: dict[str, Any]


@attrs.frozen
class Event:
    """One line of the consumer's JSON log that carries an ``event``."""

    event: str
    time: float
    message: str


def log_time(stamp: str) -> float:
    moment = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def events(consumer: Consumer, name: str | None = None) -> list[Event]:
    """The consumer's log events so far (all of them, or those called ``name``)."""
    found = []
    for line in consumer.log().splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or something that is not the logger's
        if not isinstance(data, dict) or "event" not in data:
            continue
        if name is None or data["event"] == name:
            found.append(Event(str(data["event"]), log_time(data["time"]), str(data["message"])))
    return found


def failures(consumer: Consumer) -> list[float]:
    """When ``consumer`` showed that its connection was gone: its ``reconnecting``
    lines, and the errors of retry or dead-letter copies that could not be published
    (which come first: the ``reconnecting`` line waits for such a settlement to end)."""
    found = []
    for line in consumer.log().splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or "time" not in data:
            continue
        if data.get("event") == "reconnecting" or "could not publish" in str(data["message"]):
            found.append(log_time(data["time"]))
    return found


def connection_lost_at(consumer: Consumer, after: float) -> float | None:
    """The first of :func:`failures` at ``after`` or later (the log's times have
    millisecond resolution)."""
    return next((at for at in failures(consumer) if at >= after - 0.002), None)


# -- the report ------------------------------------------------------------------------


@attrs.define
class FaultReport:
    """The figures of one fault test (one JSON line in ``STRICTCONSUME_FAULT_REPORT``).

    ``finished`` and ``dead_lettered`` count distinct ids; ``duplicated`` counts the ids
    that ended more than once (finished twice, dead-lettered twice, or both);
    ``redelivered_after_end`` counts the handler runs that ended (ok, fail or reject:
    their settlement was sent) and whose message was delivered again all the same,
    the settlement lost with the connection: the cause of every duplicate;
    ``recover_s`` holds, per injection, the seconds from the injection to the next
    ``ready`` line of a consumer; ``figures`` holds what a fault measures besides.
    """

    fault: str
    backend: str
    injected: int
    published: int
    finished: int
    dead_lettered: int
    duplicated: int
    lost: int
    handler_runs: int
    redelivered_after_end: int
    recover_s: list[float]
    wall_s: float
    figures: dict[str, float] = attrs.Factory(dict)

    def emit(self) -> None:
        line = json.dumps(attrs.asdict(self), sort_keys=False)
        print(f"FaultReport {line}")
        path = os.environ.get("STRICTCONSUME_FAULT_REPORT")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(line + "\n")


# -- the load --------------------------------------------------------------------------


def load(
    total: int,
    rng: random.Random,
    *,
    fail: float = 0.02,
    reject: float = 0.02,
    slow: float = 0.01,
    sleep_max: float = 0.2,
    slow_min: float = 2.0,
    slow_max: float = 4.0,
) -> list[dict[str, object]]:
    """``total`` messages with unique ids, in a shuffled mix of kinds: the given
    fractions fail on every attempt, are rejected, or sleep ``slow_min`` to ``slow_max`` seconds
    (to be in flight when a fault hits); the rest are ``ok``. All but the slow ones
    sleep up to ``sleep_max`` seconds."""
    counts = {"fail": round(total * fail), "reject": round(total * reject)}
    counts["slow"] = round(total * slow)
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    kinds += ["ok"] * (total - len(kinds))
    rng.shuffle(kinds)
    tag = uuid.uuid4().hex[:6]
    messages: list[dict[str, object]] = []
    for i, kind in enumerate(kinds):
        sleep = rng.uniform(slow_min, slow_max) if kind == "slow" else rng.uniform(0, sleep_max)
        messages.append({"id": f"{kind}-{i:05d}-{tag}", "kind": kind, "sleep": round(sleep, 3)})
    return messages


# -- the run ---------------------------------------------------------------------------


def _ids(messages: Sequence[dict[str, object]], *kinds: str) -> set[str]:
    return {str(m["id"]) for m in messages if m["kind"] in kinds}


@attrs.define
class FaultRun:
    """One fault test: its node, its load, its consumers, and the figures."""

    fault: str
    backend: str
    node: Node
    harness: Harness
    messages: list[dict[str, object]]
    db: Path
    prefetch: int = 50
    grace_period: float = 5.0
    began: float = attrs.Factory(time.time)
    consumers: list[Consumer] = attrs.Factory(list)
    killed: set[int] = attrs.Factory(set)
    #: When a consumer process ended (wall clock), besides its log's reconnect events.
    process_ends: list[float] = attrs.Factory(list)
    injected: int = 0
    recover_s: list[float] = attrs.Factory(list)
    figures: dict[str, float] = attrs.Factory(dict)
    rng: random.Random = attrs.Factory(random.Random)

    @classmethod
    def prepare(
        cls,
        fault: str,
        backend: str,
        node: Node,
        harness: Harness,
        total: int,
        *,
        mix: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> FaultRun:
        """Declare the queue on ``node``, publish the load (``mix``: :func:`load`'s
        options) and make the empty record; ``kwargs`` set the run's fields."""
        rng = random.Random()
        messages = load(total, rng, **(mix or {}))
        db = harness.directory / "runs.sqlite"
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(SCHEMA)
        conn.close()
        run = cls(fault, backend, node, harness, messages, db, rng=rng, **kwargs)
        declare(node.url, harness.queue)
        began = time.monotonic()
        publish(node.url, harness.queue, messages)
        took = time.monotonic() - began
        kinds = collections.Counter(str(m["kind"]) for m in messages)
        print(f"[{backend}] {fault}: published {total} ({dict(kinds)}) in {took:.1f} s")
        return run

    @property
    def queue(self) -> str:
        return self.harness.queue

    @property
    def retry_queues(self) -> list[str]:
        """``<queue>.retry.<delay in ms>``, one per delay (design section 3)."""
        return [f"{self.queue}.retry.{round(d * 1000)}" for d in RETRY_DELAYS]

    @property
    def tag(self) -> str:
        return f"[{self.backend}] {self.fault}:"

    # -- consumers

    def start(self, *, url: str | None = None) -> Consumer:
        """A consumer process on the node (or ``url``) and the shared record."""
        consumer = self.harness.start(
            self.backend,
            "--prefetch",
            str(self.prefetch),
            "--grace-period",
            str(self.grace_period),
            "--log-format",
            "json",
            url=url or self.node.url,
            env={
                "FAULT_APP_DB": str(self.db),
                "FAULT_APP_RETRY": ",".join(str(d) for d in RETRY_DELAYS),
            },
            target=APP,
        )
        self.consumers.append(consumer)
        return consumer

    def wait_ready(self, consumer: Consumer, count: int, timeout: float = 30) -> float:
        """Wait for the ``count``-th ``ready`` line of ``consumer``; returns its time."""
        consumer.wait_for(
            lambda: len(events(consumer, "ready")) >= count, timeout, f"ready line {count}"
        )
        return events(consumer, "ready")[count - 1].time

    def recovered(self, consumer: Consumer, ready_before: int, injected_at: float) -> float:
        """Wait for ``consumer``'s next ``ready`` line and record the recovery time."""
        ready = self.wait_ready(consumer, ready_before + 1, timeout=90)
        self.recover_s.append(round(ready - injected_at, 3))
        return ready

    def kill(self, consumer: Consumer) -> float:
        """SIGKILL ``consumer``; returns when (wall clock)."""
        at = time.time()
        consumer.send(signal.SIGKILL)
        self.killed.add(consumer.proc.pid)
        self.process_ends.append(at)
        return at

    def breaks(self) -> list[float]:
        """When a consumer lost its connection (:func:`failures`), and when the
        processes that are gone ended."""
        found = [at for c in self.consumers for at in failures(c)]
        return sorted(found + self.process_ends)

    # -- the record

    def runs(self) -> list[Run]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute(
                "SELECT run, id, kind, pid, attempt, redelivered, started, ended, outcome "
                "FROM runs ORDER BY run"
            ).fetchall()
        finally:
            conn.close()
        return [Run(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8]) for r in rows]

    def progress(self) -> int:
        """How many ids have finished (a run with outcome ``ok``)."""
        return len({r.id for r in self.runs() if r.outcome == "ok"})

    def wait_progress(self, consumer: Consumer, fraction: float, timeout: float = 60) -> int:
        """Wait until ``fraction`` of the ``ok``/``slow`` ids finished."""
        target = fraction * len(_ids(self.messages, "ok", "slow"))
        consumer.wait_for(
            lambda: self.progress() >= target, timeout, f"{fraction:.0%} of the load finished"
        )
        return self.progress()

    def wait_slow_in_flight(self, consumer: Consumer, timeout: float = 30) -> None:
        """Wait until a ``slow`` run of ``consumer`` started less than 0.5 s ago, so
        that a fault now finds at least one handler in flight for 1.5 s more at least
        (a slow one sleeps 2 s or more), longer than the SIGTERM test's grace period."""

        def one() -> bool:
            now = time.time()
            return any(
                r.kind == "slow"
                and r.ended is None
                and now - r.started < 0.5
                and r.pid == consumer.proc.pid
                for r in self.runs()
            )

        consumer.wait_for(one, timeout, "a slow handler starting")

    # -- the end

    def _handled(self) -> bool:
        """Every message has its last run in the record: ``ok`` ids finished, reject
        ids rejected, fail ids failed at their last attempt."""
        runs = self.runs()
        ok = {r.id for r in runs if r.outcome == "ok"}
        rejected = {r.id for r in runs if r.outcome == "reject"}
        failed = {r.id for r in runs if r.outcome == "fail" and r.attempt >= MAX_ATTEMPTS}
        return (
            _ids(self.messages, "ok", "slow") <= ok
            and _ids(self.messages, "reject") <= rejected
            and _ids(self.messages, "fail") <= failed
        )

    def _counts(self) -> dict[str, int]:
        """Ready messages in the queue, its retry queues and its dead-letter queue."""
        names = [self.queue, f"{self.queue}.dlq", *self.retry_queues]
        with pika_channel(self.node.url) as ch:
            return {
                name: int(ch.queue_declare(name, passive=True).method.message_count)
                for name in names
            }

    def _settled(self) -> bool:
        counts = self._counts()
        dead = len(_ids(self.messages, "fail", "reject"))
        return counts.pop(f"{self.queue}.dlq") >= dead and not any(counts.values())

    def _poll(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if all(c.proc.poll() is not None for c in self.consumers):
                return condition()
            time.sleep(0.2)
        return False

    def dead_letters(self) -> list[DeadLetter]:
        """Take every message out of ``<queue>.dlq`` (basic.get with auto-ack)."""
        got = []
        with pika_channel(self.node.url) as ch:
            while (message := get_from(ch, f"{self.queue}.dlq")) is not None:
                got.append(DeadLetter(str(json.loads(message.body)["id"]), message.headers or {}))
        return got

    def check(self, consumer: Consumer, timeout: float = 90) -> FaultReport:
        """Wait until the load is settled, stop ``consumer``, read everything back,
        emit the report and assert the invariant (see the module's docstring)."""
        handled = self._poll(self._handled, timeout)
        settled = handled and self._poll(self._settled, 20)
        # The retry queues are quorum queues. What `_settled` read (queue.declare-ok's
        # message count) is the queue's live Raft state; what `rabbitmqctl list_queues`
        # shows for a quorum queue is a figure the queue publishes on its tick
        # (`quorum_tick_interval`, 5 s), so it may still count copies that have left
        # since: the 60 failing messages pass through `.retry.500` within half a
        # second, at the tail of the load. Wait for a fresh figure, then assert it.
        queues = list_queues(self.node.args)
        deadline = time.monotonic() + QUORUM_FIGURES_REFRESHED
        while time.monotonic() < deadline and (
            queues.get(self.queue, (0, 0))[1]
            or any(queues.get(name, (0, 0)) != (0, 0) for name in self.retry_queues)
        ):
            time.sleep(0.3)
            queues = list_queues(self.node.args)
        exit_code = None
        if consumer.proc.poll() is None:
            consumer.send(signal.SIGTERM)
            exit_code, _ = consumer.wait_exit(self.grace_period + 15)
        dead_letters = self.dead_letters()
        runs = self.runs()
        again = self._redelivered_after_end(runs)
        ages = [age for _, age in again if age is not None]
        self.figures["end_to_break_max_s"] = round(max(ages, default=0.0), 3)
        report = self._report(runs, dead_letters, len(again))
        report.emit()

        published = {str(m["id"]) for m in self.messages}
        logs = "\n".join(c.log() for c in self.consumers)
        assert settled, (
            f"not settled within {timeout:g} s (handled in the record: {handled}); "
            f"queues: {queues}; report: {report}\n{consumer.tail()}"
        )
        assert report.lost == 0, f"lost: {self._lost(runs, dead_letters)}"
        finished = {r.id for r in runs if r.outcome == "ok"}
        assert finished == _ids(self.messages, "ok", "slow"), finished ^ _ids(
            self.messages, "ok", "slow"
        )
        assert {d.id for d in dead_letters} == _ids(self.messages, "fail", "reject")
        fails, rejects = _ids(self.messages, "fail"), _ids(self.messages, "reject")
        for dead in dead_letters:
            assert dead.id in published
            headers = dead.headers
            assert headers.get("x-failed-queue") == self.queue, headers
            assert isinstance(headers.get("x-failed-at"), str), headers
            assert dead.id in str(headers.get("x-error-message")), headers
            if dead.id in fails:
                assert headers.get("x-error-type") == FAIL_TYPE, headers
                assert headers.get("x-attempt") == MAX_ATTEMPTS, headers
            else:
                assert dead.id in rejects
                assert headers.get("x-error-type") == REJECT_TYPE, headers
                assert headers.get("x-attempt") == 1, headers
        for name in (self.queue, *self.retry_queues):
            assert queues.get(name) == (0, 0), f"{name}: (ready, unacked) = {queues.get(name)}"
        assert queues.get(f"{self.queue}.dlq", (0, 0))[1] == 0, queues
        self._check_unended(runs)
        unexplained = [r for r, age in again if age is None]
        assert not unexplained, f"redelivered after they ended, with no fault after: {unexplained}"
        for bad in BAD_LOG:
            assert bad not in logs, f"{bad!r} in a consumer's log:\n{logs}"
        assert exit_code in (0, None), consumer.tail()
        return report

    def _lost(self, runs: Sequence[Run], dead_letters: Sequence[DeadLetter]) -> set[str]:
        ended = {r.id for r in runs if r.outcome == "ok"} | {d.id for d in dead_letters}
        return {str(m["id"]) for m in self.messages} - ended

    def _check_unended(self, runs: Sequence[Run]) -> None:
        """A run that was cancelled, or never ended because its process was killed,
        is followed by a redelivered run of the same id; only killed processes leave
        runs that never ended."""
        later: dict[str, list[Run]] = collections.defaultdict(list)
        for r in runs:
            later[r.id].append(r)
        for r in runs:
            if r.outcome is None:
                assert r.pid in self.killed, f"a run of a live process never ended: {r}"
            if r.outcome in (None, "cancelled"):
                again = [x for x in later[r.id] if x.run > r.run and x.redelivered]
                assert again, f"{r} was not redelivered: {later[r.id]}"

    def _redelivered_after_end(self, runs: Sequence[Run]) -> list[tuple[Run, float | None]]:
        """The runs that ended (so their settlement was sent) and whose message came
        back redelivered all the same; each with the seconds from its end to the next
        break of a connection (0 when it ended just after the break was seen; None
        when no break followed: nothing explains it)."""
        breaks = self.breaks()
        by_id: dict[str, list[Run]] = collections.defaultdict(list)
        for r in runs:
            by_id[r.id].append(r)
        found: list[tuple[Run, float | None]] = []
        for r in runs:
            if r.ended is None or r.outcome == "cancelled":
                continue
            if not any(x.run > r.run and x.redelivered for x in by_id[r.id]):
                continue
            # a handler may end in the scheduler round that sees the break, before
            # its cancellation arrives: its ack cannot go out either
            after = [max(b - r.ended, 0.0) for b in breaks if b >= r.ended - 0.05]
            found.append((r, round(min(after), 3) if after else None))
        return found

    def _report(
        self, runs: Sequence[Run], dead_letters: Sequence[DeadLetter], redelivered_after_end: int
    ) -> FaultReport:
        published = {str(m["id"]) for m in self.messages}
        finished = collections.Counter(r.id for r in runs if r.outcome == "ok")
        dead = collections.Counter(d.id for d in dead_letters)
        ended = finished + dead
        return FaultReport(
            fault=self.fault,
            backend=self.backend,
            injected=self.injected,
            published=len(published),
            finished=len(set(finished) & published),
            dead_lettered=len(set(dead) & published),
            duplicated=sum(1 for n in ended.values() if n > 1),
            lost=len(self._lost(runs, dead_letters)),
            handler_runs=len(runs),
            redelivered_after_end=redelivered_after_end,
            recover_s=self.recover_s,
            wall_s=round(time.time() - self.began, 1),
            figures=self.figures,
        )


# -- the broker's process --------------------------------------------------------------


def beam_pid(node: Node) -> int:
    """The pid of the node's ``beam.smp``, from ``rabbitmq.pid`` in its directory.

    RabbitMQ writes its own (the beam's) pid there (``RABBITMQ_PID_FILE``);
    ``scripts/dev-broker`` writes the pid of the process it started only when the file
    is still missing once the node answers, which would be ``runuser``, not the beam.
    So the pid is checked (a ``beam.smp`` whose environment names the node: the node
    name is not on its command line), and the beam looked up that way otherwise.
    """
    from ..conftest import dev_broker

    marker = f"RABBITMQ_NODENAME=strictconsume-{node.name}@".encode()

    def is_beam(pid: int) -> bool:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return comm == "beam.smp" and any(v.startswith(marker) for v in environ.split(b"\0"))

    pid_file = Path(dev_broker(*node.args, "dir").stdout.strip()) / "rabbitmq.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid and is_beam(pid):
        return pid
    beams = [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and is_beam(int(p.name))
    ]
    assert len(beams) == 1, f"the beam.smp of node {node.name}: {beams} (pid file: {pid})"
    return beams[0]


def url_with_query(url: str, **query: object) -> str:
    """``url`` with the given query parameters (``heartbeat=2``)."""
    return url + "?" + "&".join(f"{k}={v}" for k, v in query.items())
