"""Consume throughput and latency of strictconsume against its peers: the benchmark suite.

usage: python3 benchmarks/run.py [--quick] [--repeat R] [--messages N] [--prefetch LIST]
                                 [--libraries LIST] [--workloads LIST] [--no-latency]
                                 [--node-name NAME] [--node-port PORT] [--out DIR] ...

The one command: ``python3 benchmarks/run.py`` (any Python >= 3.11) first runs
``scripts/bootstrap test,dev,bench`` (installs the bench extra into .venv; a no-op when
it is there), then runs itself again with .venv's Python (``--no-bootstrap`` skips
the install). The broker is STRICTCONSUME_URL / AMQP_URL when set, otherwise a private node of
scripts/dev-broker: ``--node-name`` / ``--node-port`` (default: dev-broker's default
node, ``dev`` on 5673), started when it is not running and then stopped at the end.

Throughput. For every workload (``noop``: the handler does nothing; ``sleep10ms``: it
awaits a 10 ms sleep), every prefetch (1, 10, 100, 1000) and every repetition, each
library in turn, in an order that rotates from one repetition to the next (so that a
noisy neighbour or the broker's housekeeping hurts every library alike):

1. fill the queue with N persistent 128-byte messages (strictconsume.amqp on trio,
   publisher confirms), then check that the broker counts exactly N;
2. drain it in a child process (benchmarks/_consumers.py, which documents the code of
   every library and the documentation pattern it follows) with one manual ack per
   message, and time it from subscribing until the consumer's connection is closed,
   which the broker answers only after it processed every ack sent before;
3. check: no consumer left, no message ready (an unacked message is requeued when its
   channel closes, so a ready one is an ack that never arrived), the retry and
   dead-letter queues empty, and (private node only) ``rabbitmqctl list_queues`` shows
   0 ready / 0 unacked / 0 consumers. A failed check stops the benchmark. A run whose
   connection an operator closed (320 CONNECTION_FORCED, as a test suite sharing the
   broker does with ``close_all_connections``) is done again, twice at most, and noted.

Libraries: strictconsume-trio, strictconsume-asyncio, aio-pika, aiormq, pika,
faststream, and broker-ceiling (pika with ``auto_ack=True`` and no handler, the fastest
client of benchmarks/client_throughput.py: what the broker and loopback deliver to one
consumer when no ack is awaited; the qos is set to the prefetch but RabbitMQ ignores it
for an auto-ack consumer, so its four prefetch rows are four measures of one ceiling;
noop only). ``aio-pika-iterator`` (aio-pika's README consumer, one message at a time)
is available through ``--libraries``.

The queue is declared once, the framework's way (an App starts on it and stops), so it
carries the framework's dead-letter arguments and has its ``.retry.*`` and ``.dlq``
queues; the peers declare it passively (or not at all) and use it as it is.

N: ``--messages`` (default 10,000; 1,000 with --quick) for noop. For sleep10ms the ideal
is prefetch / 10 ms messages per second, so N is min(--messages, prefetch * 100 *
--sleep-seconds) (a run of about --sleep-seconds at the ideal; default 2, 1 with
--quick), and pika, which sleeps one message at a time, drains min(that, 100 *
--sleep-seconds). Every row records its N.

Latency (unless --no-latency): with the queue empty and a consumer subscribed
(prefetch --latency-prefetch, default 100, noop handler, manual acks), the parent
publishes --latency-rate messages per second (default 200) for --latency-seconds
(default 5; 2 with --quick), each body carrying its publish time (CLOCK_MONOTONIC);
each handler notes its start minus that time. Every library once per repetition,
rotating; the delays of all repetitions pooled into a median, a p99 and a max.

Outputs, in --out (default benchmarks/results), named ``bench`` (``bench-quick`` with
--quick, or --stem): ``bench.json``, ``bench.md`` (the markdown report, also printed),
``bench-noop.png`` and ``bench-sleep10ms.png`` (throughput against prefetch, log x and
y, one line per library). While it runs: a progress bar on a terminal, one line per run
otherwise (CI).

The JSON document (schema ``strictconsume-bench/1``; fields are only ever added)::

    {
      "schema": "strictconsume-bench/1",
      "meta": {"date", "title", "quick", "repeat", "runs", "wall_s", "python", "cpus",
               "rabbitmq", "broker", "versions": {package: version}, "libraries": [...],
               "notes": [str]},
      "throughput": [            # one row per library, workload and prefetch
        {"library": str,         # strictconsume-trio, ..., broker-ceiling
         "workload": str,        # noop | sleep10ms
         "prefetch": int,
         "messages": int,        # N drained per run
         "msgs_per_s": float,    # median of the runs
         "min": float, "max": float,
         "runs": [float],        # messages per second of every run, in run order
         "ideal_msgs_per_s": float | null,   # prefetch / 10 ms for sleep10ms
         "cpu_us_per_msg": float,            # consumer's CPU per message, median
         "teardown_ms": float,   # last handler to closed connection, median
         "peak_rss_mb": float}   # the consumer process's VmHWM, largest of the runs
      ],
      "latency": [               # one row per library
        {"library": str, "prefetch": int, "rate": float, "messages": int (per run),
         "runs": int, "median_ms": float, "p99_ms": float, "max_ms": float}
      ]
    }

Figures are machine-dependent: quote the libraries of one run as ratios, never
absolute numbers across machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BOOTSTRAPPED = "STRICTCONSUME_BENCH_BOOTSTRAPPED"


def bootstrap() -> None:
    """Install the bench extra (unless --no-bootstrap) and run this script again with
    .venv's Python (unless it runs it already)."""
    if "--no-bootstrap" not in sys.argv and os.environ.get(BOOTSTRAPPED) != "1":
        subprocess.run([str(REPO / "scripts" / "bootstrap"), "test,dev,bench"], check=True)
        os.environ[BOOTSTRAPPED] = "1"
    venv = REPO / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve() and (venv / "bin" / "python").exists():
        python = str(venv / "bin" / "python")
        os.execv(python, [python, __file__, *sys.argv[1:]])


if __name__ == "__main__":
    bootstrap()

# The imports below need the venv that bootstrap() provides.
# ruff: noqa: E402
import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from _broker import Node, broker_url, external_url
from _consumers import (
    CONSUMERS,
    DISTURBED_EXIT,
    HANDLER_TIMEOUT,
    URL_VARIABLE,
    WORKLOADS,
    BenchmarkError,
    Disturbed,
    forced_close,
    publish_stamp,
)
from _report import CEILING, ideal, markdown, plot
from _workers import workers_run

T = TypeVar("T")

CONSUMERS_PY = HERE / "_consumers.py"
RESULTS = HERE / "results"
DEFAULT_LIBRARIES = (
    "strictconsume-trio",
    "strictconsume-asyncio",
    "aio-pika",
    "aiormq",
    "pika",
    "faststream",
    CEILING,
)
LATENCY_LIBRARIES = DEFAULT_LIBRARIES[:-1]
BODY = b"x" * 128
#: Publishes in flight at once while filling (each awaits its confirm).
FILL_BATCH = 500
#: Seconds a consumer may take: this plus one per 100 messages.
CHILD_TIMEOUT = 60.0
#: Attempts at one run (or one setup step) whose connection an operator closed.
MAX_ATTEMPTS = 3


@dataclass
class Config:
    url: str
    node: Node | None  # None: an outside broker, which rabbitmqctl does not reach
    queue: str
    messages: int
    sleep_seconds: float
    notes: list[str] = field(default_factory=list)

    def n(self, library: str, workload: str, prefetch: int) -> int:
        """The messages one run drains (see the module docstring)."""
        if workload == "noop":
            return self.messages
        n = min(self.messages, round(prefetch * 100 * self.sleep_seconds))
        if library == "pika":
            n = min(n, round(100 * self.sleep_seconds))
        return n


def retried(what: str, action: Callable[[], T], notes: list[str]) -> T:
    """``action()``, again (at most :data:`MAX_ATTEMPTS` in all) when an operator
    closed its connection; any other error propagates at once."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == MAX_ATTEMPTS or not forced_close(exc):
                raise
            notes.append(f"{what}: a connection was closed by an operator; done again")
            print(f"  {notes[-1]}", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def side_queues(queue: str) -> list[str]:
    """The retry and dead-letter queues the framework declares beside ``queue``."""
    from strictconsume import Retry
    from strictconsume._retry import dead_letter_queue_name, retry_queue_name

    return [retry_queue_name(queue, d) for d in sorted(set(Retry().delays))] + [
        dead_letter_queue_name(queue)
    ]


# -- the queue: declare, fill, check, delete --------------------------------------------


def declare(url: str, queue: str) -> None:
    """Declare the queue, its retry queues and its dead-letter queue as the App does:
    by starting an App on it (the queue is empty then) and stopping it."""
    import anyio

    import strictconsume as sc

    app = sc.App(url)

    @app.consumer(queue, timeout=HANDLER_TIMEOUT)
    async def handle(msg: sc.Message) -> None:
        raise AssertionError("the queue was to be empty")

    # The App resolves annotations in the module's globals, where the local import
    # ``sc`` is not: give it the class itself.
    handle.__annotations__["msg"] = sc.Message

    async def main() -> None:
        async with app.running():
            pass

    anyio.run(main, backend="trio")


def fill(url: str, queue: str, n: int) -> None:
    """Publish ``n`` persistent 128-byte messages with confirms; check the count."""
    import anyio

    from strictconsume.amqp import Properties, connect

    async def main() -> None:
        async with connect(url) as conn:
            async with conn.channel() as ch:
                ok = await ch.queue_declare(queue, passive=True)
                if ok.message_count or ok.consumer_count:
                    await ch.queue_purge(queue)  # left over by an aborted run
            async with conn.channel(confirms=True) as ch:
                publish = functools.partial(
                    ch.publish, BODY, routing_key=queue, properties=Properties(delivery_mode=2)
                )
                sent = 0
                while sent < n:
                    batch = min(FILL_BATCH, n - sent)
                    async with anyio.create_task_group() as tg:
                        for _ in range(batch):
                            tg.start_soon(publish)
                    sent += batch
                ok = await ch.queue_declare(queue, passive=True)
                if ok.message_count != n:
                    raise BenchmarkError(
                        f"filled {n} messages (all confirmed) but the broker counts "
                        f"{ok.message_count} in {queue!r}"
                    )

    anyio.run(main, backend="trio")


def publish_paced(url: str, queue: str, n: int, rate: float) -> None:
    """Publish ``n`` messages at ``rate`` per second on a fixed schedule, each body
    carrying its publish time, with confirms (awaited in the background)."""
    import anyio

    from strictconsume.amqp import Properties, connect

    async def main() -> None:
        props = Properties(delivery_mode=2)
        async with (
            connect(url) as conn,
            conn.channel(confirms=True) as ch,
            anyio.create_task_group() as tg,
        ):
            begin = anyio.current_time()
            for i in range(n):
                await anyio.sleep_until(begin + i / rate)
                publish = functools.partial(
                    ch.publish, publish_stamp(), routing_key=queue, properties=props
                )
                tg.start_soon(publish)

    anyio.run(main, backend="trio")


def check_drained(cfg: Config) -> None:
    """Fail unless every message of the queue was acked: no consumer, none ready, none
    unacknowledged, nothing in the retry and dead-letter queues."""
    import anyio

    from strictconsume.amqp import connect

    queue = cfg.queue

    async def main() -> None:
        async with connect(cfg.url) as conn, conn.channel() as ch:
            deadline = time.monotonic() + 10
            while True:
                ok = await ch.queue_declare(queue, passive=True)
                if ok.consumer_count == 0:
                    break
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"{queue!r} still has {ok.consumer_count} consumer(s)")
                await anyio.sleep(0.02)
            # Once the consumer is gone the broker has requeued whatever it had left
            # unacked, so a message ready now is an ack that never reached the broker.
            if ok.message_count:
                raise BenchmarkError(
                    f"{ok.message_count} message(s) back in {queue!r} after the consumer "
                    "stopped: acks that did not reach the broker"
                )
            for name in side_queues(queue):
                side = await ch.queue_declare(name, passive=True)
                if side.message_count:
                    raise BenchmarkError(f"{side.message_count} message(s) in {name!r}")

    anyio.run(main, backend="trio")
    if cfg.node is None:
        return  # rabbitmqctl does not reach an outside broker: the above must do
    out = cfg.node.ctl(
        "list_queues", "name", "messages_ready", "messages_unacknowledged", "consumers"
    )
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[0] == queue:
            if fields[1:] != ["0", "0", "0"]:
                raise BenchmarkError(
                    f"rabbitmqctl: {queue!r} has ready/unacked/consumers {fields[1:]}, "
                    "expected 0/0/0"
                )
            return
    raise BenchmarkError(f"rabbitmqctl list_queues did not list {queue!r}:\n{out}")


def delete(url: str, queue: str) -> None:
    import anyio

    from strictconsume.amqp import connect

    async def main() -> None:
        async with connect(url) as conn, conn.channel() as ch:
            for name in [queue, *side_queues(queue)]:
                await ch.queue_delete(name)

    anyio.run(main, backend="trio")


# -- one run ------------------------------------------------------------------------------


def child_command(cfg: Config, library: str, workload: str, prefetch: int, n: int) -> list[str]:
    return [sys.executable, str(CONSUMERS_PY), library, workload, cfg.queue, str(prefetch), str(n)]


def child_env(cfg: Config) -> dict[str, str]:
    return dict(os.environ, **{URL_VARIABLE: cfg.url})


def child_result(library: str, what: str, returncode: int, stdout: str, stderr: str) -> Any:
    if returncode == DISTURBED_EXIT:
        raise Disturbed(stderr.strip().splitlines()[-1])
    if returncode != 0:
        raise BenchmarkError(f"{library} {what} failed (exit {returncode}):\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


def throughput_run(cfg: Config, library: str, workload: str, prefetch: int) -> dict[str, Any]:
    """Fill the queue, drain it with ``library`` in a child process, check it."""
    n = cfg.n(library, workload, prefetch)
    fill(cfg.url, cfg.queue, n)
    out = subprocess.run(
        child_command(cfg, library, workload, prefetch, n),
        capture_output=True,
        text=True,
        env=child_env(cfg),
        timeout=CHILD_TIMEOUT + n / 100,
    )
    what = f"{workload} at prefetch {prefetch}"
    data: dict[str, Any] = child_result(library, what, out.returncode, out.stdout, out.stderr)
    check_drained(cfg)
    data["messages"] = n
    return data


def latency_run(
    cfg: Config, library: str, prefetch: int, rate: float, seconds: float
) -> dict[str, Any]:
    """Start ``library``'s consumer on the empty queue, publish at ``rate`` once it is
    subscribed, collect its delays, check the queue."""
    n = round(rate * seconds)
    with subprocess.Popen(
        [*child_command(cfg, library, "noop", prefetch, n), "--latency"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(cfg),
    ) as proc:
        assert proc.stdout is not None
        try:
            if proc.stdout.readline().strip() == "ready":
                publish_paced(cfg.url, cfg.queue, n, rate)
            stdout, stderr = proc.communicate(timeout=CHILD_TIMEOUT)
        except BaseException:
            proc.kill()
            raise
    data: dict[str, Any] = child_result(library, "latency run", proc.returncode, stdout, stderr)
    check_drained(cfg)
    return data


# -- the progress display -----------------------------------------------------------------


class Progress:
    """A rich progress bar on a terminal; a plain line per run otherwise (CI logs)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.began = time.monotonic()
        self._rich: Any = None
        self._task: Any = None

    @contextlib.contextmanager
    def shown(self) -> Iterator[Progress]:
        if not sys.stdout.isatty():
            yield self
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        with RichProgress(
            TextColumn("{task.description:<46}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ) as bar:
            self._rich = bar
            self._task = bar.add_task("starting", total=self.total)
            yield self
            self._rich = None

    def starting(self, what: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=what)

    def finished(self, line: str) -> None:
        self.done += 1
        text = f"[{self.done}/{self.total} {time.monotonic() - self.began:4.0f}s] {line}"
        if self._rich is not None:
            self._rich.console.print(text, highlight=False)
            self._rich.advance(self._task)
        else:
            print(text, flush=True)

    def note(self, line: str) -> None:
        if self._rich is not None:
            self._rich.console.print(line, highlight=False)
        else:
            print(line, flush=True)


# -- the whole suite ------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {}
    for package in ("strictconsume", "trio", "anyio", "aio-pika", "aiormq", "pika", "faststream"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def rabbitmq_version(node: Node | None) -> str:
    if node is None:
        return "(outside broker)"
    try:
        return node.ctl("version").strip()
    except subprocess.CalledProcessError:
        return "(unknown)"


def parse_list(value: str, known: tuple[str, ...] | None, what: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if known is not None:
        for item in items:
            if item not in known:
                raise SystemExit(f"unknown {what} {item!r} (known: {', '.join(known)})")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small N, once")
    parser.add_argument("--repeat", type=int, help="repetitions (default 5; 1 with --quick)")
    parser.add_argument("--messages", type=int, help="N for noop (default 10000; 1000 quick)")
    parser.add_argument(
        "--sleep-seconds", type=float, help="sleep10ms runs last about this at the ideal (2)"
    )
    parser.add_argument("--prefetch", default="1,10,100,1000")
    parser.add_argument("--libraries", default=",".join(DEFAULT_LIBRARIES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    parser.add_argument("--latency-libraries", default=",".join(LATENCY_LIBRARIES))
    parser.add_argument("--latency-rate", type=float, default=200.0)
    parser.add_argument("--latency-seconds", type=float, help="per run (default 5; 2 quick)")
    parser.add_argument("--latency-prefetch", type=int, default=100)
    parser.add_argument(
        "--no-workers", action="store_true", help="skip --workers 2 against one worker"
    )
    parser.add_argument("--workers-prefetch", type=int, default=100)
    parser.add_argument("--node-name", help="dev-broker node (default: dev-broker's default)")
    parser.add_argument("--node-port", type=int, help="its AMQP port")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    parser.add_argument("--stem", help="output file names (default bench, bench-quick)")
    parser.add_argument(
        "--no-bootstrap", action="store_true", help="do not run scripts/bootstrap first"
    )
    ns = parser.parse_args()

    known = tuple(CONSUMERS)
    libraries = parse_list(ns.libraries, known, "library")
    workloads = parse_list(ns.workloads, WORKLOADS, "workload")
    latency_libraries = [] if ns.no_latency else parse_list(ns.latency_libraries, known, "library")
    if CEILING in latency_libraries:
        raise SystemExit("the broker ceiling has no latency run (it has no handler)")
    prefetches = [int(p) for p in ns.prefetch.split(",")]
    repeat: int = ns.repeat or (1 if ns.quick else 5)
    latency_seconds: float = ns.latency_seconds or (2.0 if ns.quick else 5.0)
    stem = ns.out / (ns.stem or ("bench-quick" if ns.quick else "bench"))

    node = None if external_url() else Node(ns.node_name, ns.node_port)
    started_node = node is not None and not node.running()
    url = broker_url(node)
    rabbitmq = rabbitmq_version(node)
    cfg = Config(
        url=url,
        node=node,
        queue=f"bench-{uuid.uuid4().hex[:8]}",
        messages=ns.messages or (1000 if ns.quick else 10000),
        sleep_seconds=ns.sleep_seconds or (1.0 if ns.quick else 2.0),
    )

    plan: list[tuple[str, int, str]] = []
    for workload in workloads:
        libs = [lib for lib in libraries if lib != CEILING or workload == "noop"]
        for prefetch in prefetches:
            for rep in range(repeat):
                shift = rep % len(libs)
                plan += [(workload, prefetch, lib) for lib in libs[shift:] + libs[:shift]]
    latency_plan = []
    for rep in range(repeat):
        shift = rep % max(1, len(latency_libraries))
        latency_plan += latency_libraries[shift:] + latency_libraries[:shift]

    # --workers 2 against one worker: noop, interleaved with each other every repetition.
    workers_plan = (
        []
        if ns.no_workers
        else [w for rep in range(repeat) for w in ((1, 2) if rep % 2 == 0 else (2, 1))]
    )
    workers_rates: dict[int, list[float]] = {}
    workers_skew: dict[int, list[float]] = {}
    rates: dict[tuple[str, str, int], list[float]] = {}
    cpu: dict[tuple[str, str, int], list[float]] = {}
    teardown: dict[tuple[str, str, int], list[float]] = {}
    rss: dict[tuple[str, str, int], float] = {}
    counts: dict[tuple[str, str, int], int] = {}
    delays: dict[str, list[float]] = {}
    latency_n: dict[str, int] = {}
    began = time.monotonic()
    progress = Progress(len(plan) + len(latency_plan) + len(workers_plan))
    try:
        retried("declaring the queue", functools.partial(declare, url, cfg.queue), cfg.notes)
        with progress.shown():
            for workload, prefetch, lib in plan:
                progress.starting(f"{workload} prefetch {prefetch}: {lib}")
                data = retried(
                    f"{lib}, {workload} at prefetch {prefetch}",
                    functools.partial(throughput_run, cfg, lib, workload, prefetch),
                    cfg.notes,
                )
                key = (lib, workload, prefetch)
                n = data["messages"]
                rate = n / data["elapsed"]
                rates.setdefault(key, []).append(rate)
                cpu.setdefault(key, []).append(1e6 * data["cpu"] / n)
                teardown.setdefault(key, []).append(1000 * (data["elapsed"] - data["handlers"]))
                rss[key] = max(rss.get(key, 0.0), data["peak_rss_mb"])
                counts[key] = n
                progress.finished(
                    f"{workload:9} prefetch {prefetch:4} {lib:21} {rate:9,.0f} msg/s "
                    f"(N {n}) {cpu[key][-1]:4.0f} us CPU/msg {data['peak_rss_mb']:5.1f} MB"
                )
            for count in workers_plan:
                progress.starting(f"--workers {count}")
                n = cfg.messages
                retried("filling", functools.partial(fill, url, cfg.queue, n), cfg.notes)
                data = retried(
                    f"--workers {count}",
                    functools.partial(workers_run, url, cfg.queue, count, ns.workers_prefetch, n),
                    cfg.notes,
                )
                check_drained(cfg)
                rate = n / data["elapsed"]
                workers_rates.setdefault(count, []).append(rate)
                workers_skew.setdefault(count, []).append(data["skew_s"])
                progress.finished(
                    f"noop      prefetch {ns.workers_prefetch:4} --workers {count:<11} "
                    f"{rate:9,.0f} msg/s (N {n}, second worker {data['skew_s']:.2f} s later)"
                )
            for lib in latency_plan:
                progress.starting(f"latency: {lib}")
                data = retried(
                    f"{lib}, latency",
                    functools.partial(
                        latency_run,
                        cfg,
                        lib,
                        ns.latency_prefetch,
                        ns.latency_rate,
                        latency_seconds,
                    ),
                    cfg.notes,
                )
                mine: list[float] = data["delays_us"]
                delays.setdefault(lib, []).extend(mine)
                latency_n[lib] = len(mine)
                progress.finished(
                    f"latency   prefetch {ns.latency_prefetch:4} {lib:21} median "
                    f"{statistics.median(mine) / 1000:6.2f} ms, max {max(mine) / 1000:6.2f} ms"
                )
    except BenchmarkError as exc:
        raise SystemExit(f"benchmark failed: {exc}") from exc
    finally:
        try:
            retried("deleting the queue", functools.partial(delete, url, cfg.queue), cfg.notes)
        finally:
            if started_node and node is not None:
                node.stop()
    wall = time.monotonic() - began

    rows: list[dict[str, Any]] = []
    for workload, prefetch, lib in dict.fromkeys(plan):
        key = (lib, workload, prefetch)
        rows.append(
            {
                "library": lib,
                "workload": workload,
                "prefetch": prefetch,
                "messages": counts[key],
                "msgs_per_s": statistics.median(rates[key]),
                "min": min(rates[key]),
                "max": max(rates[key]),
                "runs": rates[key],
                "ideal_msgs_per_s": ideal(workload, prefetch),
                "cpu_us_per_msg": statistics.median(cpu[key]),
                "teardown_ms": statistics.median(teardown[key]),
                "peak_rss_mb": rss[key],
            }
        )
    rows.sort(
        key=lambda r: (workloads.index(r["workload"]), r["prefetch"], libraries.index(r["library"]))
    )
    latency_rows = []
    for lib in latency_libraries:
        ms = sorted(d / 1000 for d in delays[lib])
        latency_rows.append(
            {
                "library": lib,
                "prefetch": ns.latency_prefetch,
                "rate": ns.latency_rate,
                "messages": latency_n[lib],
                "runs": repeat,
                "median_ms": statistics.median(ms),
                "p99_ms": statistics.quantiles(ms, n=100)[98],
                "max_ms": ms[-1],
            }
        )
    doc = {
        "schema": "strictconsume-bench/1",
        "meta": {
            "date": datetime.date.today().isoformat(),
            "title": "Smoke run (--quick: small N, one repetition)"
            if ns.quick
            else f"Median of {repeat} interleaved repetitions",
            "quick": ns.quick,
            "repeat": repeat,
            "runs": len(plan) + len(latency_plan),
            "wall_s": wall,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "rabbitmq": rabbitmq,
            "broker": "an outside broker" if node is None else "a private node on loopback",
            "versions": versions(),
            "libraries": libraries,
            "notes": cfg.notes,
        },
        "throughput": rows,
        "latency": latency_rows,
        "workers": [
            {
                "workers": count,
                "prefetch": ns.workers_prefetch,
                "messages": cfg.messages,
                "msgs_per_s": statistics.median(found),
                "min": min(found),
                "max": max(found),
                "runs": found,
                "skew_s": statistics.median(workers_skew[count]),
            }
            for count, found in sorted(workers_rates.items())
        ],
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_name(stem.name + ".json")
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    report = markdown(doc)
    md_path = stem.with_name(stem.name + ".md")
    md_path.write_text(report)
    pngs = plot(doc, stem)
    print()
    print(report)
    for path in [json_path, md_path, *pngs]:
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
