"""A soak: one million messages through one App, with faults, and its memory over time.

usage: .venv/bin/python benchmarks/soak.py [--messages 1000000] [--backend trio,asyncio]
           [--prefetch 100] [--interval 10] [--close-every 75] [--no-restart]
           [--warmup 0.1] [--fail-every 1000] [--node-name soak] [--node-port 5697]
           [--out benchmarks/results] [--stem soak]

Does memory stay flat over a long run with faults, and does every per-message
structure stay in proportion to the prefetch? For each backend in turn (one soak each):

1. **The node.** A private node of ``scripts/dev-broker`` (``--node-name``,
   ``--node-port``; started if needed, stopped at the end when this started it). It is
   restarted mid-run, so it must be a node of the soak's own: an outside broker
   (``STRICTCONSUME_URL``) is refused.
2. **The consumer**: a child process (``--role consumer``) running ONE App on the
   backend, one ``@app.consumer`` on a fresh durable queue, prefetch ``--prefetch``, a
   handler that does no work but note the message's id. Every ``--fail-every``-th id
   raises on its first attempt (``Retry(delays=(0.5,))``: a retry copy goes through
   ``<queue>.retry.500`` and succeeds on attempt 2), so the publishing side of the App
   (retry copies, their confirms) soaks too; 0 turns that off. The ids seen are counted
   in a ``bytearray`` of ``--messages`` counters allocated at start, so the bookkeeping
   of the soak itself does not grow with the messages handled.
3. **The publisher**: a child process (``--role publisher``) with ``strictconsume.amqp``
   on trio: persistent messages of 128 bytes, ``message_id`` = the id (0 to N-1),
   publisher confirms, 200 publishes in flight. It starts first, and the consumer
   once the queue holds 40,000 (the queue is declared beforehand as the App declares
   it, by ``tests/processes.py``'s ``declare``). It keeps a backlog in the queue: a
   task reads the queue's ready count (a passive declare) every 0.2 s and pauses the
   publishing from 40,000 until it is below 20,000, so the consumer never starves
   (the reads that found the queue empty once it had been filled are counted:
   ``empty_checks``). On a lost connection it connects again (backoff 0.5 s to 5 s)
   and publishes again every id that was in flight, unconfirmed (a message the broker
   took but whose confirm was lost is then there twice: a duplicate, counted, never a
   loss; ``republished`` counts the ids taken again, including those that were
   waiting for the pause to end and had not been sent).
4. **Faults** (from this process): ``rabbitmqctl close_all_connections`` every
   ``--close-every`` seconds (75: consumer and publisher reconnect; a little over the
   60 s after which the App's reconnect backoff resets, design section 5, so that each
   close meets a backoff that starts again at 0.5 s: closes closer together are
   answered by ever longer waits, up to 30 s, and the soak measures the backoff more
   than the App), and one restart of the
   node (``dev-broker stop`` then ``start``: the Erlang VM stops, the durable queue and
   its persistent messages come back) once half of the ids were handled
   (``--no-restart``, ``--close-every 0`` turn them off). Faults stop once every id was
   handled. Their times are recorded.
5. **Samples.** A task in the consumer's own event loop writes a sample every
   ``--interval`` seconds (10): ``VmRSS`` and ``VmHWM`` from ``/proc/self/status``; the
   ids handled, unique and duplicated; the number of tasks alive (trio: the task tree
   from the root task; asyncio: ``asyncio.all_tasks()``); and per-message structures,
   read from the App's private attributes (a benchmark may; named here so that a
   refactor that renames them is noticed: they read as ``null`` then):
   ``app._supervisor.dispatchers[0]._state`` (the dispatcher's ``_ChannelState``) for
   ``tracker.size`` (the ack tracker's tags), ``len(running)`` (the handlers' table)
   and ``inflight``. Since a snapshot every 10 s could miss a peak, the same task reads
   those three every 0.25 s as well and each sample carries their maxima since the
   previous sample. And, by ``gc.collect()`` and a walk of ``gc.get_objects()`` once
   per sample, the count of live objects of the per-message types (``Delivery``,
   ``Message``, ``Ack``, ``Waiter``, coroutines, tasks, cancel scopes, futures) and of
   all tracked objects.
6. **The end.** Once the publisher has every id confirmed and the consumer has seen
   every id, and the queue and its retry queue are empty (live counts of passive
   declares) with no handler running: a last sample, SIGTERM (a graceful stop), and
   the checks: every id handled at least once (``lost`` = ids never seen = 0), the
   queue, ``<queue>.dlq`` and ``<queue>.retry.500`` empty after the consumer left
   (a message still unacked would have come back as ready), ``rabbitmqctl
   list_queues`` 0 ready and 0 unacked for the queue, the App's outcomes (acks =
   runs that returned, one outcome per handler run), and the consumer's exit
   code 0. A failed check is printed and makes the exit code 1.

**Growth** (:func:`growth`): warm-up ends with the first sample taken once
``--warmup`` (10%) of the ids were handled; growth is the RSS of the last sample taken
while consuming (before the stop) over the RSS at warm-up end, in percent. The soak
passes when it is below 5%. Also given: the largest RSS after warm-up and a
least-squares slope of RSS over the ids handled after warm-up (KB per 100,000
messages). Proportion to the prefetch: the maxima of the tracker size, of the
handlers' table, of ``inflight`` and of live ``Delivery`` / ``Message`` objects, as
multiples of the prefetch.

Writes ``<out>/<stem>.json`` (schema ``strictconsume-soak/1``: ``meta``, and per
backend its ``samples``, ``faults`` with times, ``counts``, ``checks``, throughput and
the growth figures) and ``<out>/<stem>.png`` (RSS over the ids handled for each
backend with the faults marked; below, the tracker size and per-message object counts).
Develop with ``--messages 50000 --interval 2``; the committed figures are one run of
1,000,000 per backend.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _broker

from _broker import REPO, Node, external_url

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "strictconsume-soak/1"
BODY = b"s" * 128
#: The publisher's backlog: below LOW_WATER ready messages it publishes up to HIGH_WATER.
LOW_WATER = 20_000
HIGH_WATER = 40_000
#: Publishes awaiting their confirm at once.
PUBLISH_WINDOW = 200
RETRY_DELAY = 0.5
#: How often the consumer's sampler reads the cheap figures (tracker, table, inflight).
PEEK_EVERY = 0.25
#: A progress line every PROGRESS_EVERY peeks (one a second).
PROGRESS_EVERY = 4
#: The largest acceptable RSS growth after warm-up, in percent.
GROWTH_LIMIT = 5.0
#: The per-message types counted in each sample (by class name, over gc.get_objects()).
WATCHED_TYPES = (
    "Delivery",
    "Message",
    "Ack",
    "Waiter",
    "coroutine",
    "Task",
    "CancelScope",
    "Future",
)


# -- the figures (pure; tested in tests/test_soak.py) ----------------------------------


def warmup_end(samples: Sequence[dict[str, Any]], total: int, warmup: float) -> int | None:
    """The index of the first sample taken once ``warmup`` of ``total`` ids were
    handled (unique), or None when no sample reached it."""
    for i, sample in enumerate(samples):
        if sample["unique"] >= warmup * total:
            return i
    return None


def growth(samples: Sequence[dict[str, Any]], total: int, warmup: float) -> dict[str, Any]:
    """RSS growth from the end of warm-up to the last sample.

    Args:
        samples: The samples taken while consuming, in time order, each with
            ``rss_kb`` and ``unique`` (ids handled so far).
        total: The ids of the run.
        warmup: The fraction of ``total`` that ends the warm-up.

    Returns:
        ``warmup_index``, ``rss_warm_kb``, ``rss_end_kb``, ``growth_pct`` (end over
        warm-up), ``max_after_kb``, ``max_growth_pct`` and ``slope_kb_per_100k`` (least
        squares of RSS over the ids handled, after warm-up); the figures are None when
        no sample follows the end of the warm-up.
    """
    start = warmup_end(samples, total, warmup)
    empty: dict[str, Any] = {
        "warmup_index": start,
        "rss_warm_kb": None,
        "rss_end_kb": None,
        "growth_pct": None,
        "max_after_kb": None,
        "max_growth_pct": None,
        "slope_kb_per_100k": None,
    }
    if start is None or start >= len(samples) - 1:
        return empty
    after = samples[start:]
    warm = after[0]["rss_kb"]
    end = after[-1]["rss_kb"]
    top = max(s["rss_kb"] for s in after)
    xs = [float(s["unique"]) for s in after]
    ys = [float(s["rss_kb"]) for s in after]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = (
        sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        if spread
        else 0.0
    )
    return {
        "warmup_index": start,
        "rss_warm_kb": warm,
        "rss_end_kb": end,
        "growth_pct": round(100.0 * (end - warm) / warm, 2),
        "max_after_kb": top,
        "max_growth_pct": round(100.0 * (top - warm) / warm, 2),
        "slope_kb_per_100k": round(slope * 100_000, 1),
    }


def proportion(samples: Sequence[dict[str, Any]], prefetch: int) -> dict[str, Any]:
    """The largest per-message figures of the samples, and as multiples of ``prefetch``.

    A figure the App no longer exposes under the name the sampler reads is None in
    every sample and is left out.
    """
    found: dict[str, Any] = {}
    for name in ("tracker_max", "running_max", "inflight_max"):
        values = [s[name] for s in samples if s.get(name) is not None]
        if values:
            found[name] = max(values)
    for name in ("Delivery", "Message", "Ack", "Waiter"):
        values = [s["objects"].get(name, 0) for s in samples if "objects" in s]
        if values:
            found[f"{name}_max"] = max(values)
    found["per_prefetch"] = {k: round(v / prefetch, 2) for k, v in found.items()}
    return found


# -- the consumer (a child process) -----------------------------------------------------


def _status_kb() -> dict[str, int]:
    found = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                found[key] = int(value.split()[0])
    return {"rss_kb": found["VmRSS"], "hwm_kb": found["VmHWM"]}


def _tasks_alive(backend: str) -> int:
    if backend == "asyncio":
        import asyncio

        return len(asyncio.all_tasks())
    import trio

    count = 0
    root = trio.lowlevel.current_root_task()
    todo = [] if root is None else [root]
    while todo:
        task = todo.pop()
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


def _object_counts() -> dict[str, int]:
    counts = dict.fromkeys(WATCHED_TYPES, 0)
    gc.collect()  # count what is alive, not cycles waiting for the collector
    objects = gc.get_objects()
    for obj in objects:
        name = type(obj).__name__
        if name in counts:
            counts[name] += 1
    counts["all"] = len(objects)
    return counts


def run_consumer(config: dict[str, Any]) -> None:
    """The App, its sampler, and the summary line on exit (see the module's docstring)."""
    import anyio

    import strictconsume as sc

    backend: str = config["backend"]
    total: int = config["messages"]
    fail_every: int = config["fail_every"]
    out = open(config["samples"], "a", encoding="utf-8")  # noqa: SIM115 (closed at exit)
    seen = bytearray(total)
    counts = {"runs": 0, "handled": 0, "unique": 0, "duplicates": 0, "failed_once": 0}
    app = sc.App(config["url"], grace_period=10.0)
    retry = sc.Retry(delays=(RETRY_DELAY,))

    @app.consumer(config["queue"], prefetch=config["prefetch"], timeout=30.0, retry=retry)
    async def handle(msg: sc.Message) -> None:
        counts["runs"] += 1
        n = int(msg.message_id or "")
        if fail_every and n % fail_every == 0 and msg.attempt == 1:
            counts["failed_once"] += 1
            raise RuntimeError(f"soak: id {n} fails on its first attempt")
        counts["handled"] += 1
        if seen[n]:
            counts["duplicates"] += 1
        else:
            counts["unique"] += 1
        if seen[n] < 255:
            seen[n] += 1

    handle.__annotations__["msg"] = sc.Message

    def emit(record: dict[str, Any]) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    def peek() -> tuple[int | None, int | None, int | None]:
        supervisor = getattr(app, "_supervisor", None)
        dispatchers = getattr(supervisor, "dispatchers", None) or [None]
        state = getattr(dispatchers[0], "_state", None)
        if state is None:
            return None, None, None
        tracker = getattr(getattr(state, "tracker", None), "size", None)
        running = getattr(state, "running", None)
        return tracker, None if running is None else len(running), getattr(state, "inflight", None)

    maxima: dict[str, int] = {}

    def note_peek() -> None:
        for name, value in zip(("tracker", "running", "inflight"), peek(), strict=True):
            if value is not None:
                maxima[name] = max(maxima.get(name, 0), value)

    def sample(kind: str = "sample") -> None:
        tracker, running, inflight = peek()
        record: dict[str, Any] = {
            "kind": kind,
            "time": time.time(),
            **_status_kb(),
            **counts,
            "tracker": tracker,
            "running": running,
            "inflight": inflight,
            "tracker_max": maxima.get("tracker"),
            "running_max": maxima.get("running"),
            "inflight_max": maxima.get("inflight"),
            "tasks": _tasks_alive(backend),
            "objects": _object_counts(),
            "reconnects": app.reconnects,
            "outcomes": {f"{q}:{o}": n for (q, o), n in app.outcomes.items()},
        }
        maxima.clear()
        emit(record)

    async def sampler() -> None:
        next_sample = math.inf  # until the App is ready
        peeks = 0
        while True:
            await anyio.sleep(PEEK_EVERY if next_sample < math.inf else 0.05)
            if next_sample == math.inf:
                if not app.ready:
                    continue
                emit({"kind": "ready", "time": time.time()})
                sample()
                next_sample = time.monotonic() + config["interval"]
                continue
            note_peek()
            peeks += 1
            if peeks % PROGRESS_EVERY == 0:  # for the controller: faults, the end
                emit({"kind": "progress", "time": time.time(), **counts})
            if time.monotonic() >= next_sample:
                next_sample += config["interval"]
                sample()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler)
            await app.run()
            sample("final")
            tg.cancel_scope.cancel()

    anyio.run(main, backend=backend)
    missing = [i for i, n in enumerate(seen) if not n]
    emit(
        {
            "kind": "summary",
            "time": time.time(),
            **counts,
            "lost": len(missing),
            "lost_ids": missing[:20],
            "duplicated_ids": sum(1 for n in seen if n > 1),
            "outcomes": {f"{q}:{o}": n for (q, o), n in app.outcomes.items()},
        }
    )
    out.close()


# -- the publisher (a child process) ----------------------------------------------------


def run_publisher(config: dict[str, Any]) -> None:
    """Keep a backlog in the queue until every id is confirmed (see the docstring);
    prints its figures as one JSON line."""
    import anyio

    from strictconsume.amqp import AMQPError, Properties, connect

    url, queue, total = config["url"], config["queue"], config["messages"]
    confirmed = bytearray(total)
    figures: dict[str, int] = {
        "confirmed": 0,
        "published": 0,
        "republished": 0,
        "reconnects": 0,
        "checks": 0,
        # checks that found the queue empty once it had been filled: the consumer starved
        "empty_checks": 0,
        "min_ready_after_fill": -1,  # -1: never filled
    }
    again: list[int] = []  # ids published on a connection that broke, not confirmed
    inflight: set[int] = set()
    fresh = iter(range(total))
    filled = False

    def next_id() -> int | None:
        if again:
            figures["republished"] += 1
            return again.pop()
        return next(fresh, None)

    async def session() -> None:
        nonlocal filled
        async with connect(url, connection_timeout=5) as conn:
            open_gate = anyio.Event()
            open_gate.set()
            gate = [open_gate]

            async def monitor(done: anyio.Event) -> None:
                nonlocal filled
                async with conn.channel() as ch:
                    while not done.is_set():
                        ready = (await ch.queue_declare(queue, passive=True)).message_count
                        figures["checks"] += 1
                        if ready >= HIGH_WATER:
                            filled = True
                            if gate[0].is_set():
                                gate[0] = anyio.Event()
                        elif ready < LOW_WATER and not gate[0].is_set():
                            gate[0].set()
                        if filled:
                            low = figures["min_ready_after_fill"]
                            figures["min_ready_after_fill"] = ready if low < 0 else min(low, ready)
                            figures["empty_checks"] += ready == 0
                        await anyio.sleep(0.2)

            async with conn.channel(confirms=True) as ch:

                async def worker() -> None:
                    while (n := next_id()) is not None:
                        inflight.add(n)  # from here on, a break publishes it again
                        await gate[0].wait()
                        props = Properties(delivery_mode=2, message_id=str(n))
                        figures["published"] += 1
                        await ch.publish(BODY, routing_key=queue, properties=props, mandatory=True)
                        inflight.discard(n)
                        if not confirmed[n]:
                            confirmed[n] = 1
                            figures["confirmed"] += 1

                done = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(monitor, done)
                    async with anyio.create_task_group() as workers:
                        for _ in range(PUBLISH_WINDOW):
                            workers.start_soon(worker)
                    done.set()

    async def main() -> None:
        failures = 0
        while figures["confirmed"] < total:
            try:
                await session()
                failures = 0
                if figures["confirmed"] < total:
                    missing = [n for n in range(total) if not confirmed[n]][:10]
                    raise RuntimeError(f"every id was published, but not confirmed: {missing}")
            except* (AMQPError, OSError):
                figures["reconnects"] += 1
                again.extend(inflight)
                inflight.clear()
                failures += 1
                await anyio.sleep(min(5.0, 0.5 * 2 ** min(failures, 4)))

    anyio.run(main, backend="trio")
    print(json.dumps(figures), flush=True)


# -- the controller ---------------------------------------------------------------------


class _Records:
    """The consumer's JSON lines, read as they come (from where the last read ended)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.records: list[dict[str, Any]] = []
        self.last_progress: dict[str, Any] = {"unique": 0, "runs": 0}

    def read(self) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as lines:
            lines.seek(self.offset)
            for line in lines:
                if not line.endswith(b"\n"):
                    break  # being written: read again next time
                self.offset += len(line)
                record = json.loads(line)
                if record["kind"] == "progress":
                    self.last_progress = record  # not kept: one per second
                else:
                    self.records.append(record)
                    if record["kind"] == "sample":
                        self.last_progress = record
        return self.records

    def progress(self) -> dict[str, Any]:
        self.read()
        return self.last_progress


def _ready_counts(url: str, queues: Sequence[str]) -> dict[str, int | None]:
    """Ready messages of each queue by a passive declare (the queue's live state), with
    pika (not the client under test); None for a queue that does not exist."""
    import pika

    found: dict[str, int | None] = {}
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for queue in queues:
            ch = connection.channel()
            try:
                found[queue] = int(ch.queue_declare(queue, passive=True).method.message_count)
                ch.close()
            except pika.exceptions.ChannelClosedByBroker:
                found[queue] = None
    finally:
        connection.close()
    return found


def _list_queue(node: Node, queue: str) -> tuple[int, int] | None:
    for line in node.ctl("list_queues", "name", "messages_ready", "messages_unacknowledged").split(
        "\n"
    ):
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    return None


def _child(role: str, config: dict[str, Any], stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, json.dumps(config)],
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
    )


def _wait_for(condition: Any, timeout: float, what: str, procs: Sequence[Any] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a child exited ({proc.returncode}) meanwhile")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:g} s")
        time.sleep(0.2)


def soak_one(
    backend: str, args: argparse.Namespace, node: Node, url: str, work: Path
) -> dict[str, Any]:
    """One soak on ``backend``: the children, the faults, the checks; its record."""
    queue = f"soak-{backend}-{uuid.uuid4().hex[:8]}"
    samples_path = work / f"{backend}.jsonl"
    config = {
        "backend": backend,
        "url": url,
        "queue": queue,
        "messages": args.messages,
        "prefetch": args.prefetch,
        "interval": args.interval,
        "fail_every": args.fail_every,
        "samples": str(samples_path),
    }
    retry_queue = f"{queue}.retry.{round(RETRY_DELAY * 1000)}"
    faults: list[dict[str, Any]] = []
    with (
        (work / f"{backend}-consumer.log").open("wb") as clog,
        (work / f"{backend}-publisher.log").open("wb") as plog,
    ):
        # A backlog before the consumer starts: the queue as the App declares it
        # (tests/processes.py), the publisher started, the consumer once it is there.
        # Imported here, not at the top: the consumer must not load pika and pytest.
        sys.path.insert(0, str(REPO))
        from tests.processes import declare

        declare(url, queue)
        pub_out = work / f"{backend}-publisher.out"
        pout = pub_out.open("wb")
        publisher = _child("publisher", config, pout, plog)
        backlog = min(HIGH_WATER, args.messages)
        _wait_for(
            lambda: _ready_counts(url, [queue])[queue] >= backlog, 300, "backlog", [publisher]
        )
        consumer = _child("consumer", config, clog, clog)
        try:
            tail = _Records(samples_path)
            records, progress = tail.read, tail.progress
            _wait_for(lambda: any(r["kind"] == "ready" for r in records()), 60, "ready", [consumer])
            began = time.time()
            restarted = not args.restart
            next_close = time.monotonic() + args.close_every if args.close_every else math.inf
            last_report = 0.0
            while progress()["unique"] < args.messages:
                for proc, name in ((consumer, "consumer"), (publisher, "publisher")):
                    if proc.poll() not in (None, 0):
                        raise RuntimeError(f"the {name} exited with {proc.returncode}")
                now = time.monotonic()
                unique = progress()["unique"]
                if not restarted and unique >= args.messages / 2:
                    restarted = True
                    at = time.time()
                    node.stop()
                    node.start()
                    faults.append({"kind": "restart", "time": at, "until": time.time()})
                    print(
                        f"  [{backend}] broker restarted at {unique:,} handled "
                        f"({time.time() - at:.1f} s)",
                        flush=True,
                    )
                    next_close = max(next_close, time.monotonic() + args.close_every / 2)
                elif now >= next_close:
                    at = time.time()
                    node.ctl("close_all_connections", "soak")
                    faults.append({"kind": "close", "time": at, "until": time.time()})
                    next_close = now + args.close_every
                if now - last_report >= 10:
                    last_report = now
                    rate = unique / max(time.time() - began, 1.0)
                    print(
                        f"  [{backend}] {unique:,} of {args.messages:,} handled "
                        f"({rate:,.0f}/s), {len(faults)} faults",
                        flush=True,
                    )
                time.sleep(0.5)
            consumed_at = time.time()
            code = publisher.wait(timeout=120)
            if code != 0:
                raise RuntimeError(f"the publisher exited with {code}")
            publisher_figures = json.loads(pub_out.read_text().strip().splitlines()[-1])

            # duplicates republished after a fault may still be queued: let them drain
            def drained() -> bool:
                counts = _ready_counts(url, [queue, retry_queue])
                last = progress()
                time.sleep(1.0)
                return not any(counts.values()) and progress()["runs"] == last["runs"]

            _wait_for(drained, 120, "drained queue", [consumer])
            consumer.send_signal(signal.SIGTERM)
            exit_code = consumer.wait(timeout=60)
        finally:
            pout.close()
            for proc in (consumer, publisher):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    all_records = records()
    samples = [r for r in all_records if r["kind"] == "sample"]
    final = next((r for r in all_records if r["kind"] == "final"), None)
    summary = next((r for r in all_records if r["kind"] == "summary"), {})
    left = _ready_counts(url, [queue, f"{queue}.dlq", retry_queue])
    listed = _list_queue(node, queue)
    outcomes = summary.get("outcomes", {})
    checks = {
        "lost": summary.get("lost") == 0,
        "queues_empty": all(v == 0 for v in left.values()),
        "nothing_unacked": listed == (0, 0),
        "acks_match_handled": outcomes.get(f"{queue}:ack") == summary.get("handled"),
        # every handler run has its outcome: an ack, or (a first attempt that raised)
        # a retry, or a requeue when its copy could not be published (a fault)
        "outcomes_match_runs": sum(outcomes.values()) == summary.get("runs"),
        "no_dead_letter": outcomes.get(f"{queue}:dead_letter", 0) == 0,
        "exit_0": exit_code == 0,
    }
    seconds = consumed_at - began
    record = {
        "backend": backend,
        "queue": queue,
        "messages": args.messages,
        "prefetch": args.prefetch,
        "consume_s": round(seconds, 1),
        "msgs_per_s": round(args.messages / seconds),
        "counts": summary,
        "publisher": publisher_figures,
        "left": left,
        "list_queues": listed,
        "checks": checks,
        "growth": growth(samples, args.messages, args.warmup),
        "proportion": proportion(samples, args.prefetch),
        "faults": [{**f, "t": round(f["time"] - began, 2)} for f in faults],
        "began": began,
        "samples": [{**s, "t": round(s["time"] - began, 2)} for s in samples],
        "final": final,
    }
    with contextlib.suppress(Exception):
        _delete_queues(url, [queue, f"{queue}.dlq", retry_queue])
    return record


def _delete_queues(url: str, queues: Sequence[str]) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = connection.channel()
        for queue in queues:
            ch.queue_delete(queue)
    finally:
        connection.close()


def summary_lines(record: dict[str, Any]) -> Iterator[str]:
    g, p, c = record["growth"], record["proportion"], record["counts"]
    kinds = [f["kind"] for f in record["faults"]]
    yield (
        f"[{record['backend']}] {record['messages']:,} messages in {record['consume_s']} s "
        f"({record['msgs_per_s']:,}/s), prefetch {record['prefetch']}; faults: "
        f"{kinds.count('close')} close_all_connections, {kinds.count('restart')} restart"
    )
    if g["growth_pct"] is not None:
        verdict = "flat" if g["growth_pct"] < GROWTH_LIMIT else "GROWS"
        yield (
            f"  RSS {g['rss_warm_kb'] / 1024:.1f} MiB at warm-up end -> "
            f"{g['rss_end_kb'] / 1024:.1f} MiB at the end: {g['growth_pct']:+.2f}% ({verdict}; "
            f"max after warm-up {g['max_after_kb'] / 1024:.1f} MiB, {g['max_growth_pct']:+.2f}%; "
            f"slope {g['slope_kb_per_100k']:+.1f} KB per 100k messages)"
        )
    else:
        yield "  RSS: too few samples after warm-up for a growth figure"
    yield "  largest: " + ", ".join(
        f"{k} {v} ({p['per_prefetch'][k]}x prefetch)" for k, v in p.items() if k != "per_prefetch"
    )
    yield (
        f"  lost {c.get('lost')}, duplicates {c.get('duplicates')} "
        f"({c.get('duplicated_ids')} ids), handler runs {c.get('runs'):,}, "
        f"retried once {c.get('failed_once')}; publisher: {record['publisher']}"
    )
    failed = [k for k, ok in record["checks"].items() if not ok]
    yield "  checks: " + ("all passed" if not failed else "FAILED: " + ", ".join(failed))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    colours = {"trio": "tab:blue", "asyncio": "tab:orange"}
    for record in result["runs"]:
        backend, samples = record["backend"], record["samples"]
        colour = colours.get(backend, "tab:green")
        xs = [s["unique"] / 1000 for s in samples]
        top.plot(
            xs,
            [s["rss_kb"] / 1024 for s in samples],
            color=colour,
            marker=".",
            label=f"{backend}: RSS ({record['growth']['growth_pct']}% after warm-up)",
        )
        idx = record["growth"]["warmup_index"]
        if idx is not None and idx < len(samples):
            top.axvline(xs[idx], color=colour, linestyle=":", linewidth=1)
        for fault in record["faults"]:
            # the fault's place on the x axis: the ids handled by then (interpolated)
            at = _unique_at(samples, fault["time"]) / 1000
            style = "--" if fault["kind"] == "restart" else "-"
            top.axvline(at, color=colour, alpha=0.35, linestyle=style, linewidth=1)
            bottom.axvline(at, color=colour, alpha=0.2, linestyle=style, linewidth=1)
        for name, marker in (("tracker_max", "o"), ("Delivery", "^"), ("Message", "s")):
            ys = [s.get(name) if name.endswith("_max") else s["objects"].get(name) for s in samples]
            bottom.plot(
                xs,
                [y if y is not None else math.nan for y in ys],
                color=colour,
                marker=marker,
                markersize=3,
                linewidth=1,
                label=f"{backend}: {name}",
            )
    prefetch = result["meta"]["prefetch"]
    bottom.axhline(prefetch, color="grey", linestyle="--", linewidth=1, label="prefetch")
    top.set_ylabel("RSS (MiB)")
    top.set_title(
        f"soak: {result['meta']['messages']:,} messages, prefetch {prefetch}; "
        "vertical lines: close_all_connections (solid), broker restart (dashed), "
        "warm-up end (dotted)",
        fontsize=9,
    )
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("per-message structures")
    bottom.set_xlabel("ids handled (thousands)")
    bottom.legend(fontsize=7, ncol=2)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _unique_at(samples: Sequence[dict[str, Any]], at: float) -> float:
    before = [s for s in samples if s["time"] <= at]
    after = [s for s in samples if s["time"] > at]
    if not before:
        return float(samples[0]["unique"]) if samples else 0.0
    if not after:
        return float(before[-1]["unique"])
    a, b = before[-1], after[0]
    share = (at - a["time"]) / (b["time"] - a["time"])
    return float(a["unique"] + share * (b["unique"] - a["unique"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--backend", default="trio,asyncio")
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--close-every",
        type=float,
        default=75.0,
        help="seconds between close_all_connections (0: none)",
    )
    parser.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="no broker restart at half the ids",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.1, help="share of the ids that ends the warm-up"
    )
    parser.add_argument(
        "--fail-every",
        type=int,
        default=1000,
        help="every N-th id fails its first attempt (0: none)",
    )
    parser.add_argument("--node-name", default="soak")
    parser.add_argument("--node-port", type=int, default=5697)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="soak")
    parser.add_argument("--role", choices=("consumer", "publisher"), help=argparse.SUPPRESS)
    parser.add_argument("config", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "consumer":
        run_consumer(json.loads(args.config))
        return 0
    if args.role == "publisher":
        run_publisher(json.loads(args.config))
        return 0
    if args.messages < 1:
        parser.error(f"--messages must be at least 1, not {args.messages}")
    if external_url():
        parser.error(
            "the soak restarts its broker, so it runs a private node of scripts/dev-broker "
            "(--node-name, --node-port); unset STRICTCONSUME_URL / AMQP_URL"
        )
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for backend in backends:
        if backend not in ("trio", "asyncio"):
            parser.error(f"--backend takes trio and asyncio, not {backend!r}")
    node = Node(args.node_name, args.node_port)
    started = not node.running()
    url = node.start()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    print(
        f"soak: {args.messages:,} messages per backend on {node.name}:{node.port}; "
        f"logs and samples in {work}",
        flush=True,
    )
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "messages": args.messages,
            "prefetch": args.prefetch,
            "interval_s": args.interval,
            "close_every_s": args.close_every,
            "restart": args.restart,
            "warmup": args.warmup,
            "fail_every": args.fail_every,
            "growth_limit_pct": GROWTH_LIMIT,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "rabbitmq": node.ctl("version").strip(),
        },
        "runs": [],
    }
    try:
        for backend in backends:
            record = soak_one(backend, args, node, url, work)
            result["runs"].append(record)
            for line in summary_lines(record):
                print(line, flush=True)
    finally:
        if started:
            node.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.stem}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"{args.stem}.png")
    print(f"wrote {json_path} and {args.out / f'{args.stem}.png'}")
    passed = all(
        all(r["checks"].values())
        and r["growth"]["growth_pct"] is not None
        and r["growth"]["growth_pct"] < GROWTH_LIMIT
        for r in result["runs"]
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
