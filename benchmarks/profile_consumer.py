"""Where one consumer's time goes per message: a py-spy profile split by component,
and the scheduler's task steps per message.

usage: .venv/bin/python benchmarks/profile_consumer.py [--library L] [--workload W] [--prefetch P]
           [--messages N] [--rate HZ] [--out DIR] [--mode pyspy|steps]

The queue, its fill and its checks are the benchmark suite's (``run.py``): declared
the framework's way, filled with N persistent 128-byte messages, drained by
``_consumers.py`` exactly as ``run.py`` drains it, then checked to be empty. The broker
is the one ``run.py`` would use (``STRICTCONSUME_URL``, else dev-broker's default node,
which ``STRICTCONSUME_BROKER_PORT`` moves).

``--mode pyspy`` (default) runs the consumer under ``py-spy record --format raw
--rate HZ`` (py-spy is on PyPI: ``.venv/bin/pip install py-spy``), keeps the raw file
(collapsed stacks) in ``--out`` and prints the samples split by component, in
microseconds of sampled time per message: each sample goes to the innermost frame of
strictconsume (or of the benchmark's handler) on its stack, by the table
``COMPONENTS``; a sample with no such frame is the event loop's own work (scheduler),
the interpreter's start (imports) or the library's code for a peer (pika, aio-pika:
then the innermost frame of that library names it). Library frames between the
innermost project frame and the leaf are charged to that project frame, except a task
spawn (``spawn_impl``, ``start_soon``, ``create_task``), which is a component of its
own. py-spy runs with ``--nonblocking`` (it does not stop the consumer to sample it)
and leaves out the samples of a thread it sees idle, but it does not always recognise
one blocked in epoll: a leaf frame of ``WAITING`` is counted as idle and left out of
the busy total. The busy total is close to the CPU time the consumer reports for the
drain, which is printed beside it. Stacks of suspended coroutines are read while they
change, so a few samples come truncated (a socket call with no caller); they land in
"scheduler". With N messages at 200 Hz one sample is 5,000 / N us per message: take
a few thousand messages and read differences under a few us as noise.

``--mode steps`` (strictconsume only) runs the consumer in this process and counts,
from the first handler start to the N-th handler end, the task steps the scheduler
runs per message, by task, and the scheduler rounds (trio: ``trio.abc.Instrument``'s
``before_task_step`` and ``before_io_wait``; asyncio: every ``Handle._run`` and
``BaseEventLoop._run_once``). It also wraps, in this process only, the ack path and
the workload's sleep: ack frames per message (``Channel.ack_nowait``), how long a
finished message waits before its ack is queued (``ChannelAcks.acked`` to the
``ChannelAcks.flush`` that takes it) and how long the 10 ms sleeps really last.

Figures are the shared machine's: compare profiles taken in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.base_events
import asyncio.events
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

import _consumers
from _broker import Node, broker_url, external_url
from run import CHILD_TIMEOUT, CONSUMERS_PY, Config, check_drained, declare, delete, fill

#: (path fragment, function or "*", component), first match wins, for the innermost
#: project frame of a sample.
COMPONENTS: tuple[tuple[str, str, str], ...] = (
    ("strictconsume/amqp/_connection.py", "_reader", "reader: socket read, loop"),
    ("strictconsume/amqp/_connection.py", "_handle", "reader: event routing"),
    ("strictconsume/amqp/_connection.py", "_writer", "writer: socket send"),
    ("strictconsume/amqp/_connection.py", "_wait_for_writer", "ack path: wait for the writer"),
    ("strictconsume/amqp/_connection.py", "_wait_writable", "ack path: wait for the writer"),
    ("strictconsume/amqp/_channel.py", "_on_delivery", "reader: delivery to consumer"),
    ("strictconsume/amqp/_channel.py", "_deliver", "reader: delivery to consumer"),
    ("strictconsume/amqp/_channel.py", "ack_nowait", "ack path: ack frame"),
    ("strictconsume/amqp/_channel.py", "wait_writable", "ack path: wait for the writer"),
    ("strictconsume/amqp/_protocol.py", "ack", "ack path: ack frame"),
    ("strictconsume/amqp/_protocol.py", "data_to_send", "writer: socket send"),
    ("strictconsume/amqp/_protocol.py", "bytes_pending", "writer: socket send"),
    ("strictconsume/amqp/", "*", "reader: frame parsing (core, pamqp)"),
    ("strictconsume/_dispatch.py", "take", "dispatcher: take a delivery"),
    ("strictconsume/_dispatch.py", "_handle", "handler task: dispatcher"),
    ("strictconsume/_dispatch.py", "_process", "handler task: dispatcher"),
    ("strictconsume/_dispatch.py", "_record", "outcome: record, metrics"),
    ("strictconsume/_dispatch.py", "acked", "ack path: tracker, acker"),
    ("strictconsume/_dispatch.py", "ended", "handler task: dispatcher"),
    ("strictconsume/_dispatch.py", "flush", "ack path: tracker, acker"),
    ("strictconsume/_acks.py", "*", "ack path: tracker, acker"),
    ("strictconsume/_message.py", "*", "handler task: Message.from_delivery"),
    ("strictconsume/_queue_stats.py", "*", "queue stats: on_message hook"),
    ("strictconsume/_handler.py", "*", "handler pipeline"),
    ("strictconsume/_pipeline.py", "*", "handler pipeline"),
    ("strictconsume/_middleware.py", "*", "handler pipeline"),
    ("strictconsume/_outcome.py", "*", "outcome: record, metrics"),
    ("strictconsume/_app.py", "_record", "outcome: record, metrics"),
    ("strictconsume/_metrics.py", "*", "outcome: record, metrics"),
    ("strictconsume/_tracing.py", "*", "tracing"),
    ("strictconsume/idempotency/", "*", "idempotency"),
    ("_consumers.py", "handle", "handler body (benchmark probe, sleep)"),
    ("strictconsume/", "*", "App: start, stop, supervisor"),
)
SPAWN = ("spawn_impl", "start_soon", "create_task")
#: Libraries named (by file) for a sample whose innermost known frame is theirs.
PEERS = ("pika/", "aio_pika/", "aiormq/", "pamqp/", "faststream/")
SCHEDULER = ("trio/", "asyncio/", "anyio/", "selectors.py", "outcome/", "sniffio/")
#: Leaf frames that wait for the kernel (epoll): idle, not CPU; py-spy does not
#: always tell them from running code.
WAITING = (
    ("get_events", "_io_epoll.py"),
    ("select", "selectors.py"),
    ("poll", "selectors.py"),
    ("poll", "select_connection.py"),  # pika's
)
IDLE = "idle: waiting in epoll (not CPU)"


def frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) of each frame, root first, from py-spy's collapsed line."""
    out = []
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        out.append((name.strip(), where.rsplit(":", 1)[0].rstrip(")")))
    return out


def named(qualname: str, function: str) -> bool:
    """``Class.method`` (py-spy's name of a frame) is ``method``."""
    return qualname == function or qualname.endswith("." + function)


def component(stack: list[tuple[str, str]]) -> str:
    """The component a sample's stack is charged to (see the module docstring)."""
    leaf_name, leaf_path = stack[-1]
    if any(named(leaf_name, name) and leaf_path.endswith(path) for name, path in WAITING):
        return IDLE
    if any(name == "<module>" or "importlib" in path for name, path in stack[1:]):
        return "interpreter start, imports"
    spawned = False
    peer: str | None = None
    for name, path in reversed(stack):
        if any(named(name, spawn) for spawn in SPAWN):
            spawned = True
        if peer is None:
            peer = next((f"{path} (peer library)" for p in PEERS if path.startswith(p)), None)
        for fragment, function, what in COMPONENTS:
            if fragment in path and (function == "*" or named(name, function)):
                if fragment.startswith("strictconsume/"):
                    return "task spawn" if spawned else what
                return peer or what  # the benchmark's handler: a peer's calls in it
    if peer is not None:
        return peer
    if any(any(fragment in path for fragment in SCHEDULER) for _, path in stack):
        return "scheduler: event loop"
    return "other (" + leaf_path + ")"


Split = tuple[
    collections.Counter[str], collections.Counter[str], int, dict[str, collections.Counter[str]]
]


def split(raw: Path) -> Split:
    """Samples by component and by leaf function, the total, and each component's
    samples by leaf function, of a raw profile."""
    by_component: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parsed = frames(stack)
        total += n
        what = component(parsed)
        by_component[what] += n
        name, path = parsed[-1]
        leaf = f"{name} ({path.rsplit('/', 1)[-1]})"
        by_leaf[leaf] += n
        leaves[what][leaf] += n
    return by_component, by_leaf, total, leaves


def pyspy(cfg: Config, args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    stem = f"{args.library}-{args.workload}-p{args.prefetch}-n{args.messages}"
    raw = args.out / f"{stem}.txt"
    command = [spy, "record", "--rate", str(args.rate), "--format", "raw", "-o", str(raw)]
    # Not pausing the consumer at every sample: the overhead stays in py-spy's process.
    command += ["--nonblocking", "--"]
    command += [sys.executable, str(CONSUMERS_PY), args.library, args.workload, cfg.queue]
    command += [str(args.prefetch), str(args.messages)]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=dict(os.environ, **{_consumers.URL_VARIABLE: cfg.url}),
        timeout=CHILD_TIMEOUT + args.messages / 50,
    )
    if out.returncode != 0:
        raise SystemExit(f"the profiled consumer failed (exit {out.returncode}):\n{out.stderr}")
    # py-spy writes its own lines too: the consumer's result is the JSON line.
    result = json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])
    by_component, by_leaf, total, leaves = split(raw)
    n = args.messages
    us = 1e6 / args.rate / n  # microseconds per message of one sample
    elapsed = result["elapsed"]
    cpu = result["cpu"] / n * 1e6
    busy = total - by_component[IDLE] - by_component["interpreter start, imports"]
    print(f"{stem}: {n / elapsed:,.0f} msg/s under py-spy; the consumer's CPU over the")
    print(f"drain {cpu:.1f} us/msg; sampled {total} samples, {busy * us:.1f} us/msg busy")
    print(f"(neither idle nor start-up). Raw profile: {raw}")
    print(f"\n{'component':<46} {'us/msg':>8} {'share':>7}")
    for what, count in by_component.most_common():
        print(f"{what:<46} {count * us:8.1f} {count / total:7.1%}")
        if args.detail:
            for leaf, inner in leaves[what].most_common(args.detail):
                print(f"    {leaf[:42]:<42} {inner * us:8.1f}")
    print(f"\n{'innermost function (leaf)':<46} {'us/msg':>8} {'share':>7}")
    for what, count in by_leaf.most_common(args.top):
        print(f"{what[:46]:<46} {count * us:8.1f} {count / total:7.1%}")


class TrioSteps(trio.abc.Instrument):
    """Task steps by task name and scheduler rounds (io waits), while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.steps: collections.Counter[str] = collections.Counter()
        self.rounds = 0
        self.spawned = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.steps[task.name.rsplit(".", 1)[-1]] += 1

    def before_io_wait(self, timeout: float) -> None:
        if self.on:
            self.rounds += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.spawned += 1


class AsyncioSteps:
    """The same for asyncio: every callback run (by task coroutine or callback
    name), and every ``_run_once`` (one select and the callbacks ready)."""

    def __init__(self) -> None:
        self.on = False
        self.steps: collections.Counter[str] = collections.Counter()
        self.rounds = 0
        self.spawned = 0

    def install(self) -> None:
        run = asyncio.events.Handle._run
        run_once = asyncio.base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]
        create_task = asyncio.base_events.BaseEventLoop.create_task
        counter = self

        def counted_run(self: asyncio.events.Handle) -> None:
            if counter.on:
                counter.steps[_callback_name(self)] += 1
            run(self)

        def counted_run_once(loop: asyncio.base_events.BaseEventLoop) -> None:
            if counter.on:
                counter.rounds += 1
            run_once(loop)

        def counted_create_task(loop: Any, *a: Any, **kw: Any) -> Any:
            if counter.on:
                counter.spawned += 1
            return create_task(loop, *a, **kw)

        asyncio.events.Handle._run = counted_run  # type: ignore[method-assign]
        asyncio.base_events.BaseEventLoop._run_once = counted_run_once  # type: ignore[attr-defined]
        asyncio.base_events.BaseEventLoop.create_task = counted_create_task  # type: ignore[method-assign,assignment]


def _callback_name(handle: asyncio.events.Handle) -> str:
    callback: Any = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro: Any = owner.get_coro()
        return str(getattr(coro, "__qualname__", coro)).rsplit(".", 1)[-1]
    return str(getattr(callback, "__qualname__", callback))


class CountingProbe(_consumers.Probe):
    """The benchmark's probe, which switches the counting on at the first handler
    start and off at the N-th handler end."""

    def __init__(self, n: int, counter: TrioSteps | AsyncioSteps, trio_backend: bool) -> None:
        super().__init__(n, latency=False)
        self.counter = counter
        self.trio_backend = trio_backend

    def start(self, body: bytes) -> None:
        if self.started == 0:
            if self.trio_backend:
                assert isinstance(self.counter, TrioSteps)
                trio.lowlevel.add_instrument(self.counter)
            self.counter.on = True
        super().start(body)

    def finish(self) -> bool:
        last = super().finish()
        if last:
            self.counter.on = False
        return last


class Timing:
    """While counting: how long a finished message waits for its ack to be queued
    (``ChannelAcks.acked`` to the ``ChannelAcks.flush`` that takes it), the ack frames
    sent, and how long the workload's 10 ms sleeps last (``anyio.sleep``)."""

    def __init__(self, counter: TrioSteps | AsyncioSteps) -> None:
        self.counter = counter
        self.finished: list[float] = []
        self.holds: list[float] = []
        self.frames = 0
        self.sleeps: list[float] = []

    def install(self) -> None:
        import anyio

        from strictconsume._acks import ChannelAcks
        from strictconsume.amqp import Channel

        acked, flush, ack_nowait, sleep = (
            ChannelAcks.acked,
            ChannelAcks.flush,
            Channel.ack_nowait,
            anyio.sleep,
        )
        timing = self

        async def timed_acked(
            self: ChannelAcks, delivery_tag: int, *, alone: bool, duration: float | None = None
        ) -> None:
            if timing.counter.on:
                timing.finished.append(time.perf_counter())
            await acked(self, delivery_tag, alone=alone, duration=duration)

        async def timed_flush(self: ChannelAcks) -> None:
            now = time.perf_counter()
            timing.holds.extend(now - t for t in timing.finished)
            timing.finished.clear()
            await flush(self)

        def counted_ack_nowait(
            self: Channel, delivery_tag: int, *, multiple: bool = False, batch: bool = False
        ) -> None:
            if timing.counter.on:
                timing.frames += 1
            ack_nowait(self, delivery_tag, multiple=multiple, batch=batch)

        async def timed_sleep(delay: float) -> None:
            began = time.perf_counter()
            await sleep(delay)
            if timing.counter.on:
                timing.sleeps.append(time.perf_counter() - began)

        ChannelAcks.acked = timed_acked  # type: ignore[method-assign]
        ChannelAcks.flush = timed_flush  # type: ignore[method-assign]
        Channel.ack_nowait = counted_ack_nowait  # type: ignore[method-assign]
        anyio.sleep = timed_sleep

    def report(self, n: int) -> None:
        print(f"  ack frames per message      {self.frames / n:.3f}")
        for what, values in (
            ("ack held (finish to flush)", self.holds),
            ("10 ms sleep", self.sleeps),
        ):
            if values:
                cut = statistics.quantiles(values, n=10)
                print(
                    f"  {what:<28} mean {statistics.fmean(values) * 1e3:.3f} ms, "
                    f"median {statistics.median(values) * 1e3:.3f}, p90 {cut[-1] * 1e3:.3f}"
                )


def steps(cfg: Config, args: argparse.Namespace) -> None:
    backend = args.library.removeprefix("strictconsume-")
    if backend not in ("trio", "asyncio"):
        raise SystemExit("--mode steps counts strictconsume-trio or strictconsume-asyncio")
    counter: TrioSteps | AsyncioSteps
    if backend == "trio":
        counter = TrioSteps()
    else:
        counter = AsyncioSteps()
        counter.install()
    timing = Timing(counter)
    timing.install()
    probe = CountingProbe(args.messages, counter, backend == "trio")
    consume: Callable[..., dict[str, Any]] = _consumers.consume_strictconsume
    consume(cfg.url, cfg.queue, args.prefetch, args.workload, probe, backend)
    n = args.messages
    total = sum(counter.steps.values())
    print(f"{args.library} {args.workload} prefetch {args.prefetch}, {n} messages:")
    print(f"  task steps per message      {total / n:.2f}")
    print(f"  scheduler rounds per message {counter.rounds / n:.2f}")
    print(f"  tasks spawned per message   {counter.spawned / n:.2f}")
    timing.report(n)
    print(f"\n  {'task (or callback)':<40} {'steps/msg':>9}")
    for name, count in counter.steps.most_common(args.top):
        print(f"  {name[:40]:<40} {count / n:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--library", default="strictconsume-trio")
    parser.add_argument("--workload", default="noop", choices=_consumers.WORKLOADS)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--mode", default="pyspy", choices=("pyspy", "steps"))
    parser.add_argument("--detail", type=int, default=3, help="leaves shown per component")
    parser.add_argument("--top", type=int, default=15, help="rows of the leaf/task tables")
    parser.add_argument("--out", type=Path, default=Path("/tmp/strictconsume-profiles"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    node = None if external_url() else Node()
    url = broker_url(node)
    cfg = Config(url, node, f"bench-profile-{uuid.uuid4().hex[:8]}", args.messages, 2.0)
    declare(url, cfg.queue)
    try:
        fill(url, cfg.queue, args.messages)
        began = time.monotonic()
        if args.mode == "pyspy":
            pyspy(cfg, args)
        else:
            steps(cfg, args)
        check_drained(cfg)
        print(f"\n(drained and checked; {time.monotonic() - began:.1f} s)")
    finally:
        delete(url, cfg.queue)


if __name__ == "__main__":
    main()
