"""What each feature the App adds costs per message (metrics, JSON logs, a handler
timeout, retries), as ratios to the bare handler measured in the same run.

usage: .venv/bin/python benchmarks/feature_cost.py [--messages N] [--messages-p1 N]
                                                   [--repeat R] [--prefetch P,P]
                                                   [--variants V,V] [--calls N]

Every variant drains a queue of N persistent 230-byte JSON messages through an App
and the broker, with a handler that does no work of its own, at each prefetch (100
and 1; below prefetch 10 N is ``--messages-p1``, since a retry there takes a round
trip per message), on trio and on asyncio; the variants are interleaved R times and
each figure is the median (see ``compare_through_app`` in
benchmarks/handler_pipeline.py).
Logging is configured as ``python -m strictconsume`` does it (``configure_logging``
of the CLI), its stream sent to /dev/null (formatted and written, but no terminal or
log shipper behind it):

- ``bare``: no handler timeout, no ``--http`` (so no ``/metrics`` served), logging at
  WARNING in the text format, no middleware. The App's counters (outcomes, the
  handler-duration histogram, the queue-stats hook) are always kept: they are
  ``app.outcomes`` too and cannot be switched off; section 1 measures them alone.
- ``+metrics``: ``App(http="127.0.0.1:PORT")``: hypercorn serving ``/health`` and
  ``/metrics`` on the App's loop, scraped once a second by another process (tighter
  than Prometheus' usual 15-60 s; still one scrape per 1,000-20,000 messages here,
  and a drain at prefetch 100 may see none; the first scrape also starts the
  queue-depth polls, every 15 s).
- ``+json logs``: the CLI's ``--log-format json`` at its default level, INFO. The App
  logs nothing for an acked message (only lifecycle events and failed messages), so
  this is what the format costs a message that succeeds: nothing but the run's few
  lifecycle lines.
- ``+json log line``: the same, and the handler logs one INFO line per message with
  ``extra`` fields (``logger.info("order handled", extra={...})``): what a user who
  logs a line per message pays. Not the App's cost: the handler's.
- ``+timeout``: ``timeout=30``: the handler's timeout around every call.
- ``+retries``: every message fails once (``RuntimeError``) and succeeds on its
  retry, ``Retry(delays=(0.01,))``: the retry hop per *original* message (the copy
  published with a confirm to ``<queue>.retry.10``, the original acked, its WARNING
  log line, the copy dead-lettered back by the broker after 10 ms, and its second
  delivery and ack). Rates and CPU are per original message.
- ``all``: everything above together (json logs with the handler's line; the retry
  warnings in json too).

1. **Per message, without a broker**: CPU nanoseconds per call of what the
   dispatcher always records for every message (``Metrics.record`` of an ack with
   its duration, and ``QueueStats.message_started`` on a message without a
   timestamp, and with one), and of the handler's JSON log line of ``+json log
   line`` (the CLI's JSON formatter, written to /dev/null).
2. **Through the App and the broker**: messages per second from subscribing to the
   last handler, and the process's CPU microseconds per message meanwhile (which a
   busy neighbour disturbs less than the wall clock), each with its ratio to ``bare``.

The broker is STRICTCONSUME_URL / AMQP_URL, or the private node of scripts/dev-broker.
Writes ``benchmarks/results/feature_cost.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

import strictconsume as sc
from strictconsume._cli import configure_logging
from strictconsume._metrics import Metrics
from strictconsume._outcome import OutcomeKind
from strictconsume._queue_stats import QueueStats
from strictconsume._retry import retry_queue_name
from strictconsume.amqp import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))  # handler_pipeline, _broker

from handler_pipeline import BACKENDS, compare_through_app, drain, message, write_results

VARIANTS = (
    "bare",
    "+metrics",
    "+json logs",
    "+json log line",
    "+timeout",
    "+retries",
    "all",
)
#: What each variant turns on (``all``: everything).
FEATURES: dict[str, frozenset[str]] = {
    "bare": frozenset(),
    "+metrics": frozenset({"metrics"}),
    "+json logs": frozenset({"json"}),
    "+json log line": frozenset({"json", "log line"}),
    "+timeout": frozenset({"timeout"}),
    "+retries": frozenset({"retries"}),
    "all": frozenset({"metrics", "json", "log line", "timeout", "retries"}),
}
RETRY = sc.Retry(delays=(0.01,))
orders_log = logging.getLogger("orders")

# -- the handler and the App of each variant --------------------------------------------


async def handle(msg: sc.Message) -> None:
    pass


def log_handled(msg: sc.Message) -> None:
    orders_log.info(
        "order handled",
        extra={"queue": msg.queue, "message_id": msg.message_id, "attempt": msg.attempt},
    )


async def handle_and_log(msg: sc.Message) -> None:
    log_handled(msg)


def failing_once(handler: Callable[[sc.Message], Any]) -> Callable[[sc.Message], Any]:
    """``handler``, after raising on each message's first attempt."""

    async def fails_once(msg: sc.Message) -> None:
        if msg.attempt == 1:
            raise RuntimeError("the first attempt fails")
        await handler(msg)

    return fails_once


def log_to_devnull(features: frozenset[str], devnull: Any) -> None:
    """Logging as the CLI configures it, for ``features``; every line to ``devnull``."""
    if "json" in features:
        configure_logging("INFO", "json")
    else:
        configure_logging("WARNING", "text")
    for handler in logging.getLogger().handlers:
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(devnull)


def variant_app(
    url: str, queue: str, variant: str, prefetch: int, http_port: int
) -> tuple[sc.App, sc.ConsumerSpec]:
    features = FEATURES[variant]
    app = sc.App(
        url,
        prefetch=prefetch,
        http=f"127.0.0.1:{http_port}" if "metrics" in features else None,
        tracing=False,
    )
    handler: Callable[[sc.Message], Any] = handle_and_log if "log line" in features else handle
    if "retries" in features:
        handler = failing_once(handler)
    spec = sc.ConsumerSpec(
        queue, handler, timeout=30.0 if "timeout" in features else None, retry=RETRY
    )
    return app, spec


def drain_variant(
    url: str, queue: str, variant: str, n: int, backend: str, prefetch: int, http_port: int
) -> tuple[float, float]:
    """Messages per second and CPU us per message of ``variant`` draining ``n``
    messages of ``queue``; checks the outcomes the App counted."""
    app, spec = variant_app(url, queue, variant, prefetch, http_port)
    rate = drain(app, spec, n, backend)
    retried = app.outcomes[queue, "retry"]
    expected = n if "retries" in FEATURES[variant] else 0
    if retried != expected or app.outcomes[queue, "dead_letter"]:
        raise SystemExit(
            f"{variant}: {retried} retries (expected {expected}), "
            f"{app.outcomes[queue, 'dead_letter']} dead letters"
        )
    return rate


# -- the scraper of +metrics -------------------------------------------------------------

SCRAPER = """
import sys, time, urllib.request
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=5).read()
    except OSError:
        pass  # no App serving between two drains
    time.sleep(1.0)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def scraping(port: int) -> Iterator[None]:
    """Another process GETs ``/metrics`` on ``port`` once a second meanwhile."""
    url = f"http://127.0.0.1:{port}/metrics"
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, url])
    try:
        yield
    finally:
        scraper.terminate()
        scraper.wait()


# -- 1. per message, without a broker ------------------------------------------------


def counters_ns(calls: int, devnull: Any) -> dict[str, float]:
    """CPU nanoseconds per call of what is recorded for every message, and of the
    handler's JSON log line of ``+json log line`` (written to ``devnull``)."""
    metrics, stats = Metrics(), QueueStats()
    metrics.add_queues(["orders"])
    stats.watch([sc.ConsumerSpec("orders", handle)])
    plain = message()  # no timestamp, as the suite's messages
    published = datetime.datetime.now(datetime.UTC)
    stamped = attrs.evolve(plain, properties=Properties(timestamp=published))
    calls_of: dict[str, Callable[[], None]] = {
        "Metrics.record (ack, duration)": lambda: metrics.record("orders", OutcomeKind.ACK, 0.0002),
        "QueueStats.message_started, no timestamp": lambda: stats.message_started(plain),
        "QueueStats.message_started, timestamp": lambda: stats.message_started(stamped),
        "JSON log line of the handler (+json log line)": lambda: log_handled(plain),
    }
    log_to_devnull(FEATURES["+json logs"], devnull)
    figures: dict[str, float] = {}
    for name, call in calls_of.items():
        for _ in range(min(calls, 1000)):  # warm up
            call()
        started = time.process_time()
        for _ in range(calls):
            call()
        figures[name] = round((time.process_time() - started) / calls * 1e9)
    logging.getLogger().handlers[:] = []
    return figures


# -- the run ----------------------------------------------------------------------------


def delete_retry_queue(url: str, queue: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_delete(retry_queue_name(queue, RETRY.delays[0]))
    conn.close()


def table(doc: dict[str, Any], prefetches: list[int]) -> str:
    """The markdown table of the README: CPU us/msg and msg/s (medians), each with its
    cost as a ratio to bare (CPU: this / bare; rate: bare / this; above 1 costs more)."""
    header = ["variant"]
    for prefetch in prefetches:
        for backend in BACKENDS:
            header += [f"CPU us/msg, {backend} p{prefetch}", f"msg/s, {backend} p{prefetch}"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    for variant in doc["variants"]:
        row = [variant]
        for prefetch in prefetches:
            run = doc[f"prefetch_{prefetch}"]
            for backend in BACKENDS:
                cpu = run[f"app_cpu_us_{backend}"][variant]
                rate = run[f"app_rate_{backend}"][variant]
                row += [
                    f"{cpu['median']:.0f} (x{cpu['ratio_to_bare']:.2f})",
                    f"{rate['median']:,.0f} (x{rate['ratio_to_bare']:.2f})",
                ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument(
        "--messages-p1", type=int, default=1000, help="messages at a prefetch below 10 (1000)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--prefetch", default="100,1", help="comma-separated prefetch values (100,1)"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, bare always first"
    )
    parser.add_argument("--calls", type=int, default=200_000, help="calls of section 1")
    args = parser.parse_args()
    prefetches = [int(value) for value in args.prefetch.split(",")]
    chosen = [variant for variant in args.variants.split(",") if variant != "bare"]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    variants = ["bare", *chosen]
    doc: dict[str, Any] = {
        "messages": args.messages,
        "messages_below_prefetch_10": args.messages_p1,
        "repeat": args.repeat,
        "variants": variants,
        "load_average": os.getloadavg(),
    }

    from _broker import broker_url

    url = broker_url()
    queue = f"bench-features-{uuid.uuid4().hex[:8]}"
    port = free_port()
    with open(os.devnull, "w") as devnull, scraping(port):
        print(f"1. per message, without a broker: {args.calls} calls each", flush=True)
        doc["counters_ns"] = counters_ns(args.calls, devnull)
        for name, ns in doc["counters_ns"].items():
            print(f"     {name:<55} {ns:>5} ns")

        def run(variant: str, backend: str, prefetch: int, n: int) -> tuple[float, float]:
            log_to_devnull(FEATURES[variant], devnull)
            try:
                return drain_variant(url, queue, variant, n, backend, prefetch, port)
            finally:
                logging.getLogger().handlers[:] = []

        try:
            for prefetch in prefetches:
                n = args.messages if prefetch >= 10 else args.messages_p1
                print(
                    f"2. through the App: {n} messages, prefetch {prefetch}, "
                    f"{args.repeat} repetitions",
                    flush=True,
                )
                run_doc: dict[str, Any] = {}
                doc[f"prefetch_{prefetch}"] = run_doc

                def at_prefetch(
                    variant: str, backend: str, p: int = prefetch, n: int = n
                ) -> tuple[float, float]:
                    return run(variant, backend, p, n)

                compare_through_app(
                    run_doc,
                    url,
                    queue,
                    variants,
                    at_prefetch,
                    messages=n,
                    repeat=args.repeat,
                    baseline="bare",
                )
        finally:
            delete_retry_queue(url, queue)
    doc["load_average_after"] = os.getloadavg()

    print("cost as a ratio to bare (CPU: this / bare; msg/s: bare / this): above 1 costs more")
    print(table(doc, prefetches))
    write_results(doc, "feature_cost.json")


if __name__ == "__main__":
    main()
