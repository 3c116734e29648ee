"""``python -m strictconsume MODULE:APP --workers N``: N App processes under one
supervisor process, as uvicorn, gunicorn and FastStream run them.

Each worker is ``python -m strictconsume`` itself (same target and options, one
worker, no ``--http``), in a session of its own so that a terminal's Ctrl-C reaches
the supervisor only; each has its own connections and its own prefetch. The
supervisor:

* starts a worker again when it exits while nobody asked it to (a crash, SIGKILL, the
  OOM killer), after ``Backoff.delay(attempt, random)`` seconds, and logs why; a
  worker that fails at start-up (exit 1 or 2: wrong credentials, a topology
  mismatch, a bad module) stops the whole set with that exit code instead, since
  starting it again cannot help;
* on SIGTERM or SIGINT sends SIGTERM to every worker, each of which drains within
  the grace period (handlers finish or their messages are requeued); a second
  signal is passed on too, so the workers skip the rest of their grace period. A
  worker still alive ``KILL_AFTER`` seconds past the grace period is killed (the
  broker requeues what it held). The supervisor exits 0 only if every worker did;
* with ``--http`` serves one ``/health/live``, one ``/health/ready`` (200 only while
  every worker is ready) and one ``/metrics``: it asks every worker for its own
  exposition over the link (:mod:`._worker`) and merges them (:func:`merge`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random as random_module
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream

from ._asgi import MISSING_EXTRA, NOT_FOUND, health, routes_app
from ._backoff import DEFAULT_BACKOFF, Backoff
from ._worker import INDEX_ENV, LINK_ENV, MAX_LINE

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["KILL_AFTER", "WorkerSet", "merge"]

logger = logging.getLogger("strictconsume")

#: Seconds past the grace period after which a worker that did not exit is killed.
KILL_AFTER = 10.0
#: Seconds a scrape waits for a worker's answer before leaving it out.
SCRAPE_TIMEOUT = 5.0
#: Exit codes of ``python -m strictconsume`` that mean "cannot start" (see _cli).
STARTUP_EXIT_CODES = frozenset({1, 2})

#: Gauges that are 1 only when every worker's is: the merged value is the minimum.
ALL_GAUGES = frozenset({"strictconsume_connected", "strictconsume_ready"})
#: Gauges that are the broker's figures (every worker reads the same queue): the
#: merged value is the maximum (the freshest reading), never a sum.
BROKER_GAUGE_PREFIX = "strictconsume_queue_"
SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


# -- merging the workers' metrics ------------------------------------------------------


def _combine(family: str, kind: str, sample: str, values: list[float]) -> float:
    if sample.endswith("_created"):
        return min(values)
    if kind in SUMMED_TYPES:
        return sum(values)
    if kind == "gauge":
        if family in ALL_GAUGES:
            return min(values)
        if family.startswith(BROKER_GAUGE_PREFIX):
            return max(values)
        return sum(values)
    return values[0]


def merge(live: Iterable[str], retired: Iterable[str] = ()) -> list[Metric]:
    """One set of metric families out of the workers' expositions.

    Counters and histograms are summed; of the gauges, ``strictconsume_connected``
    (and ``strictconsume_ready``) is the minimum (1 only when every worker is),
    ``strictconsume_queue_*`` gauges, the broker's figures of one queue that every
    worker reads alike, the maximum; other gauges (``strictconsume_inflight``) are
    summed. ``retired`` are the last expositions of workers that exited: their
    counters and histograms still count, so that a sum never goes down when a worker
    is replaced (its gauges are gone with it).
    """
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str]] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[float]] = {}
    for texts, counters_only in ((live, False), (retired, True)):
        for text in texts:
            for family in text_string_to_metric_families(text):
                if counters_only and family.type not in SUMMED_TYPES:
                    continue
                if not family.samples:  # the parser's stray family of a lone HELP line
                    continue
                known = families.get(family.name)
                if known is None or known[1] == "unknown":
                    families[family.name] = (family.documentation, family.type)
                for sample in family.samples:
                    if counters_only and sample.name.endswith("_created"):
                        continue
                    key = (family.name, sample.name, tuple(sample.labels.items()))
                    values.setdefault(key, []).append(sample.value)
    merged = {name: Metric(name, doc, kind) for name, (doc, kind) in families.items()}
    for (family_name, sample_name, labels), found in values.items():
        kind = families[family_name][1]
        merged[family_name].add_sample(
            sample_name, dict(labels), _combine(family_name, kind, sample_name, found)
        )
    return list(merged.values())


def render(families: Sequence[Metric]) -> bytes:
    """The Prometheus text format of ``families``."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    class Collector:
        def collect(self) -> Iterable[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


# -- the workers -----------------------------------------------------------------------


@attrs.define(eq=False)
class Worker:
    """One slot of the set, and the process that fills it now."""

    index: int
    process: anyio.abc.Process | None = None
    link: anyio.abc.SocketStream | None = None
    ready: bool = False
    ever_ready: bool = False
    #: The process now in the slot connected its link (before it consumes anything).
    linked: bool = False
    restarts: int = 0
    exit_code: int | None = None
    last_metrics: str | None = None
    scrape_lock: anyio.Lock = attrs.Factory(anyio.Lock)
    answers: Any = None  # (send, receive) of a memory stream of scrape answers


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerSet:
    """Runs ``count`` workers of ``command`` until a signal, and their health."""

    def __init__(
        self,
        command: Sequence[str],
        count: int,
        *,
        grace_period: float,
        http: str | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        random: random_module.Random | None = None,
    ) -> None:
        self.command = list(command)
        self.workers = [Worker(index) for index in range(count)]
        self.grace_period = grace_period
        self.http = http
        self.backoff = backoff
        self.random = random if random is not None else random_module.Random()
        self.stopping = anyio.Event()
        self.failed: int | None = None  # the exit code once a worker could not start
        self.killed = 0
        self.retired: list[str] = []
        self._directory = ""

    @property
    def ready(self) -> bool:
        return not self.stopping.is_set() and all(worker.ready for worker in self.workers)

    def stop(self) -> None:
        """Start a graceful stop of every worker; a second call skips the grace."""
        if self.stopping.is_set():
            logger.warning(
                "stopping again: the workers skip the rest of the grace period",
                extra={"event": "shutting_down"},
            )
        else:
            logger.info(
                "shutting down %d worker(s): each gets a grace period of %g s",
                len(self.workers),
                self.grace_period,
                extra={"event": "shutting_down"},
            )
            self.stopping.set()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)

    async def run(self) -> int:
        """Run until stopped; returns the exit code (0 when every worker exited 0)."""
        self._directory = tempfile.mkdtemp(prefix="strictconsume-workers-")
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.http is not None:
                    await stack.enter_async_context(self._serving(self.http))
                listener = await anyio.create_unix_listener(os.path.join(self._directory, "link"))
                await stack.enter_async_context(listener)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_signals)
                    tg.start_soon(listener.serve, self._linked)
                    tg.start_soon(self._deadline)
                    async with anyio.create_task_group() as workers:
                        for worker in self.workers:
                            workers.start_soon(self._keep, worker)
                    tg.cancel_scope.cancel()
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)
        if self.failed is not None:
            return self.failed
        codes = [worker.exit_code for worker in self.workers]
        if self.killed or any(code != 0 for code in codes):
            logger.error(
                "stopped; not every worker exited cleanly (exit codes %s)",
                ", ".join(str(code) for code in codes),
                extra={"event": "stopped"},
            )
            return 1
        logger.info("every worker stopped cleanly", extra={"event": "stopped"})
        return 0

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("%s received", signal.Signals(signum).name)
                self.stop()

    async def _deadline(self) -> None:
        """Kill the workers still alive ``KILL_AFTER`` s past the grace period."""
        await self.stopping.wait()
        await anyio.sleep(self.grace_period + KILL_AFTER)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                logger.error(
                    "worker %d (pid %d) did not stop within the grace period: killing it",
                    worker.index,
                    worker.process.pid,
                )
                self.killed += 1
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    def _environment(self, worker: Worker) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("STRICTCONSUME_HTTP", None)  # the supervisor serves; workers do not
        env["STRICTCONSUME_WORKERS"] = "1"
        env[LINK_ENV] = os.path.join(self._directory, "link")
        env[INDEX_ENV] = str(worker.index)
        return env

    async def _keep(self, worker: Worker) -> None:
        """Keep ``worker``'s slot filled until the stop."""
        attempt = 0
        while not self.stopping.is_set():
            started = anyio.current_time()
            process = await anyio.open_process(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                env=self._environment(worker),
                start_new_session=True,
            )
            worker.process, worker.linked = process, False
            logger.info(
                "worker %d started (pid %d)",
                worker.index,
                process.pid,
                extra={"event": "worker_started"},
            )
            if self.stopping.is_set():  # a stop came while it was being started
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            code = await process.wait()
            await process.aclose()
            worker.ready = False
            if worker.last_metrics is not None:
                self.retired = [render(merge([], [*self.retired, worker.last_metrics])).decode()]
                worker.last_metrics = None
            if self.stopping.is_set():
                # SIGTERM before the worker handled signals: it had consumed nothing.
                unstarted = code == -signal.SIGTERM and not worker.linked
                worker.exit_code = 0 if unstarted else code
                log = logger.info if worker.exit_code == 0 else logger.error
                log(
                    "worker %d (pid %d) %s",
                    worker.index,
                    process.pid,
                    describe_exit(code),
                    extra={"event": "worker_stopped"},
                )
                return
            if code in STARTUP_EXIT_CODES and not worker.ever_ready:
                logger.error(
                    "worker %d (pid %d) could not start (exit code %d): stopping every worker",
                    worker.index,
                    process.pid,
                    code,
                    extra={"event": "worker_failed"},
                )
                if self.failed is None:
                    self.failed = code
                worker.exit_code = code
                self.stop()
                return
            if anyio.current_time() - started >= self.backoff.reset_after:
                attempt = 0
            delay = self.backoff.delay(attempt, self.random.random())
            attempt += 1
            worker.restarts += 1
            logger.error(
                "worker %d (pid %d) %s; starting it again in %.2f s",
                worker.index,
                process.pid,
                describe_exit(code),
                delay,
                extra={"event": "worker_restarting", "delay": round(delay, 3)},
            )
            with anyio.move_on_after(delay):
                await self.stopping.wait()
        worker.exit_code = 0 if worker.exit_code is None else worker.exit_code

    async def _linked(self, stream: anyio.abc.SocketStream) -> None:
        """A worker's link: who it is, then its readiness and scrape answers."""
        lines = BufferedByteReceiveStream(stream)
        worker: Worker | None = None
        send, receive = anyio.create_memory_object_stream[str](1)
        async with stream, send, receive:
            try:
                hello = json.loads(await lines.receive_until(b"\n", MAX_LINE))
                worker = self.workers[int(hello["hello"])]
                if worker.process is None or worker.process.pid != hello["pid"]:
                    return  # a worker that was replaced meanwhile
                worker.link, worker.answers, worker.linked = stream, (send, receive), True
                while True:
                    message = json.loads(await lines.receive_until(b"\n", MAX_LINE))
                    if "ready" in message:
                        worker.ready = bool(message["ready"])
                        worker.ever_ready |= worker.ready
                    elif "metrics" in message:
                        worker.last_metrics = message["metrics"]
                        with contextlib.suppress(anyio.WouldBlock):
                            send.send_nowait(message["metrics"])
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                pass
            finally:
                if worker is not None and worker.link is stream:
                    worker.link, worker.answers, worker.ready = None, None, False

    async def _scrape(self, worker: Worker) -> str | None:
        async with worker.scrape_lock:
            link, answers = worker.link, worker.answers
            if link is None or answers is None:
                return None
            _, receive = answers
            with contextlib.suppress(anyio.WouldBlock):
                receive.receive_nowait()  # a late answer to a scrape that timed out
            try:
                await link.send(b'{"scrape": true}\n')
                with anyio.fail_after(SCRAPE_TIMEOUT):
                    text: str = await receive.receive()
            except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            return text

    # -- health and metrics ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serving(self, address: str) -> AsyncIterator[str]:
        from ._http import HttpServer

        try:
            import prometheus_client  # noqa: F401
        except ImportError as exc:
            raise ImportError(MISSING_EXTRA) from exc
        server = HttpServer(routes_app(self._route), address)
        server.bind()  # OSError: the address cannot be served, before any worker starts
        async with server.serving() as url:
            yield url

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/health/live":
            return health(200, running=True, workers=len(self.workers))
        if path == "/health/ready":
            return health(
                200 if self.ready else 503,
                stopping=self.stopping.is_set(),
                workers={
                    str(worker.index): {
                        "pid": None if worker.process is None else worker.process.pid,
                        "ready": worker.ready,
                        "restarts": worker.restarts,
                    }
                    for worker in self.workers
                },
            )
        if path == "/metrics":
            return await self._metrics()
        return NOT_FOUND

    async def _metrics(self) -> tuple[int, bytes, str]:
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
        from prometheus_client.metrics_core import GaugeMetricFamily, Metric

        texts: list[str] = []

        async def scrape(worker: Worker) -> None:
            text = await self._scrape(worker)
            if text is not None:
                texts.append(text)

        async with anyio.create_task_group() as tg:
            for worker in self.workers:
                tg.start_soon(scrape, worker)
        families: list[Metric] = merge(texts, self.retired)
        workers = GaugeMetricFamily(
            "strictconsume_workers",
            "Worker processes, by state (running: answering the supervisor; ready).",
            labels=["state"],
        )
        workers.add_metric(["configured"], len(self.workers))
        workers.add_metric(["running"], len(texts))
        workers.add_metric(["ready"], sum(worker.ready for worker in self.workers))
        restarts = Metric(
            "strictconsume_worker_restarts",
            "Workers started again after they exited unasked.",
            "counter",
        )
        restarts.add_sample(
            "strictconsume_worker_restarts_total",
            {},
            sum(worker.restarts for worker in self.workers),
        )
        return 200, render([*families, workers, restarts]), CONTENT_TYPE_PLAIN_0_0_4


def worker_command(target: str, options: Sequence[str]) -> list[str]:
    """The command line of one worker: this interpreter, ``-m strictconsume``."""
    return [sys.executable, "-m", "strictconsume", target, *options]
