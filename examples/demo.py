"""The README's demo: run examples/orders.py as a real process and show what it does.

Started by ``scripts/demo`` (which creates the venv and starts the private broker);
needs ``STRICTCONSUME_URL``. Steps:

1. start ``python -m strictconsume examples.orders:app`` and wait until it is ready;
2. publish seven orders to the ``shop`` exchange: four good ones (one of them large,
   so slow), one whose payment gateway fails once, one with quantity 0 and one whose
   body is not JSON;
3. wait until they are handled, retried or dead-lettered, then show the queues and
   the dead letters' ``x-error-*`` headers, and what the App serves with ``--http``:
   ``/health/ready`` and its counters in ``/metrics``;
4. publish one more large order and send SIGTERM while it runs: the App stops
   intake, lets the handler finish within the grace period, acks it, closes, exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import anyio

import strictconsume as sc
from strictconsume.amqp import ChannelClosed, connect

REPO = Path(__file__).resolve().parent.parent
QUEUES = ("orders", "orders.dlq", "orders.retry.500", "orders.retry.1000")
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}==> {text}{RESET}", flush=True)


class AppProcess:
    """The consumer process; its log lines are echoed with an ``app |`` prefix."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strictconsume", "examples.orders:app", "--http", "127.0.0.1:0"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._echo, daemon=True)
        self._reader.start()

    def _echo(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            print(f"{DIM}  app | {line.rstrip()}{RESET}", flush=True)

    def http_url(self) -> str:
        """Where the App serves health and metrics (it says so in its log)."""
        line = next(line for line in self.lines if "serving health and metrics on" in line)
        return line.split()[-1]

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def wait_for(self, text: str, times: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(text) < times:
            if self.proc.poll() is not None:
                raise SystemExit(f"demo: the app exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: timed out waiting for {text!r} in the app's log")
            time.sleep(0.05)


async def reset_queues(url: str) -> None:
    """Start from empty queues so that the demo shows the same thing every time."""
    async with connect(url) as conn:
        for queue in QUEUES:
            async with conn.channel() as ch:
                await ch.queue_delete(queue)


async def publish_orders(url: str, orders: list[tuple[str, bytes]]) -> None:
    publisher_app = sc.App(url=url)
    async with publisher_app.publisher() as pub:
        for message_id, body in orders:
            await pub.publish(
                body,
                exchange="shop",
                routing_key="order.created",
                message_id=message_id,
                content_type="application/json",
            )


def order(**fields: object) -> tuple[str, bytes]:
    return f"order-{fields['id']}", json.dumps(fields).encode()


async def show_queues(url: str) -> None:
    async with connect(url) as conn:
        for queue in QUEUES:
            async with conn.channel() as ch:
                try:
                    ok = await ch.queue_declare(queue, passive=True)
                except ChannelClosed:
                    continue
            print(f"  {queue:<20} {ok.message_count} message(s) ready")
        # basic.get without auto-ack: closing the channel puts them back
        async with conn.channel() as ch:
            while (got := await ch.get("orders.dlq")) is not None:
                headers = {
                    key: value.decode() if isinstance(value, bytes | bytearray) else value
                    for key, value in (got.properties.headers or {}).items()
                }
                print(
                    f"  dead letter {got.properties.message_id}: "
                    f"{headers.get('x-error-type')}: {headers.get('x-error-message')} "
                    f"(attempt {headers.get('x-attempt')}, at {headers.get('x-failed-at')})"
                )


def show_http(base: str) -> None:
    with urllib.request.urlopen(f"{base}/health/ready", timeout=5) as response:
        print(f"  GET /health/ready -> {response.status} {response.read().decode().strip()}")
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    print("  GET /metrics (the message counters that are not 0):")
    for line in lines:
        if line.startswith("strictconsume_messages_total") and not line.endswith(" 0.0"):
            print(f"    {line}")


def main() -> int:
    url = os.environ.get("STRICTCONSUME_URL") or os.environ.get("AMQP_URL")
    if not url:
        print("demo: set STRICTCONSUME_URL (scripts/demo does)", file=sys.stderr)
        return 2
    anyio.run(reset_queues, url)

    say("starting the consumer: python -m strictconsume examples.orders:app --http 127.0.0.1:0")
    app = AppProcess()
    try:
        app.wait_for("ready: consuming")

        say("publishing 7 orders to exchange 'shop' (routing key order.created)")
        orders = [
            order(id=1, item="tea", quantity=2),
            order(id=2, item="mugs", quantity=6, size="large"),
            order(id=3, item="kettle", quantity=1, gateway="flaky"),
            order(id=4, item="spoons", quantity=0),
            ("order-5", b"{this is not json"),
            order(id=6, item="sugar", quantity=1),
            order(id=7, item="honey", quantity=3),
        ]
        anyio.run(publish_orders, url, orders)
        print("  orders 1-7 published, each confirmed by the broker")

        say("watching: 5 handled (one after a retry), 2 dead-lettered")
        app.wait_for("handled:", times=5)
        app.wait_for("dead-lettered", times=2)
        time.sleep(0.3)

        say("the broker's queues now (read with the AMQP client)")
        anyio.run(show_queues, url)

        say(f"health and metrics, served by the app on {app.http_url()} (--http)")
        show_http(app.http_url())

        say("publishing a large order, then SIGTERM while it is being handled")
        anyio.run(publish_orders, url, [order(id=8, item="teapots", quantity=4, size="large")])
        time.sleep(1.0)
        started = time.monotonic()
        app.proc.send_signal(signal.SIGTERM)
        code = app.proc.wait(timeout=30)
        app._reader.join(timeout=5)
        print(f"  the app exited with code {code} after {time.monotonic() - started:.1f} s")

        say("the queues after the shutdown: order 8 was acked within the grace period")
        anyio.run(show_queues, url)
        return 0 if code == 0 and app.count("order 8 handled") == 1 else 1
    finally:
        if app.proc.poll() is None:
            app.proc.kill()


if __name__ == "__main__":
    sys.exit(main())
