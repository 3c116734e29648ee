"""Interop: Go, Java and Node services' headers survive strictconsume, and they read ours.

Three clients other people wrote, each from a package registry, against the real broker:

* **Go**: amqp091-go 1.5 (Debian's ``golang-github-rabbitmq-amqp091-go-dev``, built with
  Debian's ``golang-go`` in GOPATH mode, no module download): ``client.go``.
* **Java**: RabbitMQ's Java client 5.0 (Debian's ``librabbitmq-client-java`` with
  ``libslf4j-java``, compiled with the machine's JDK): ``Client.java``.
* **Node**: amqplib from npm (the version ``package.json`` pins): ``client.js``.

``scripts/interop-deps`` installs them (the session fixture runs it). For each client,
on trio and on asyncio:

1. **Theirs to us.** The client publishes two messages carrying every field type it can
   send, at its limits and nested, with every basic property. An App's handler must
   see exactly those values (checked against what the client says it sent), then fails:
   message "dlq" is retried once (a retry copy) and then dead-lettered (a copy of the
   copy), message "retry" raises ``RetryLater(3600)`` and its copy waits in
   ``<queue>.retry.4000000`` (3600 s rounded to an ad-hoc step). The client reads
   the dead letter and the retry copy and
   must find every original value *and wire type* unchanged, every property but the two
   copies change on purpose (``delivery_mode`` 2, no ``expiration``), plus the
   ``x-error-*`` / ``x-attempt`` / ``x-original-*`` headers.
2. **Ours to them.** strictconsume publishes a header of every Python type at its limits
   (once through ``app.publisher()``, once through ``strictconsume.amqp`` with every
   property) and the client must read each with the wire type the README's table gives.

A client reports what it read as JSON, each header value as ``{"t": wire type, "v":
value}`` (ints and timestamps as decimal strings, floats as their IEEE bits in hex,
strings and byte arrays as hex, a decimal as ``[scale, unscaled]``). Go's and Java's
reports come from the type each client's own decoder returns (a Go ``int32``, a Java
``Long``); amqplib turns every number into a JavaScript Number, so client.js reports
from the table bytes amqplib received and decoded.

What a client itself cannot express (so it does not send it):

* **Go** (amqp091-go): no unsigned 16/32-bit ('u', 'i') or 'L'; a Go ``int`` goes out as
  'I' truncated to 32 bits; no way to tell an absent short-string property from an
  empty one; no ``cluster_id``.
* **Java**: no unsigned types at all ('B', 'u', 'i'); a timestamp is a ``Date`` of
  milliseconds in a long, so it cannot hold more than 2**63/1000 seconds (it also reads
  such a timestamp into an overflowed Date: see ``LOSSES``).
* **Node** (amqplib): a string is always UTF-8 (no non-UTF-8 'S'); a decimal's digits
  and a timestamp are written unsigned (no negative decimal, no timestamp before 1970);
  an int is typed by its size unless written as ``{'!': 'long', value}`` (5 goes out
  as 'b', -0 as the int 0), and beyond 2**53 only as a BigInt in that form. When it
  reads, amqplib turns 'l' and 'T' into Numbers (rounded beyond 2**53), reads 'T' and a
  decimal's digits as unsigned, and replaces the bytes of a non-UTF-8 'S'.
"""

from __future__ import annotations

import datetime
import decimal
import json
import os
import shutil
import struct
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import strictconsume as sc
from strictconsume._retry import ad_hoc_delay, delay_ms
from strictconsume.amqp import Properties, Timestamp, connect

pytestmark = [pytest.mark.broker, pytest.mark.anyio]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD = HERE / ".build"
CLIENTS = ("go", "java", "node")
JAVA_CP = ":".join(
    f"/usr/share/java/{jar}.jar" for jar in ("amqp-client", "slf4j-api", "slf4j-nop")
)
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
RETRY_LATER = 3600.0
#: The retry queue that serves it: an ad-hoc delay is rounded to a step (4000 s).
RETRY_LATER_MS = delay_ms(ad_hoc_delay(RETRY_LATER))

Node = dict[str, Any]  # {"t": wire type, "v": value}


@pytest.fixture(scope="session")
def clients() -> dict[str, list[str]]:
    """The command line of each client program, installed and built."""
    deps = subprocess.run(
        [str(REPO / "scripts" / "interop-deps")], capture_output=True, text=True, timeout=900
    )
    if deps.returncode != 0:
        pytest.fail(f"scripts/interop-deps failed:\n{deps.stderr}")
    BUILD.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"/usr/share/gocode:{BUILD / 'gopath'}",
        "GOCACHE": str(BUILD / "gocache"),
    }
    subprocess.run(
        ["go", "build", "-o", str(BUILD / "goclient"), "client.go"],
        cwd=HERE,
        env=env,
        check=True,
        timeout=300,
    )
    javac = ["javac", "-nowarn", "-encoding", "UTF-8", "-cp", JAVA_CP, "-d", str(BUILD / "java")]
    subprocess.run(
        [*javac, "Client.java"],
        cwd=HERE,
        check=True,
        timeout=300,
    )
    return {
        "go": [str(BUILD / "goclient")],
        "java": ["java", "-cp", f"{JAVA_CP}:{BUILD / 'java'}", "Client"],
        "node": [shutil.which("node") or "node", str(HERE / "client.js")],
    }


def client_url(broker_url: str) -> str:
    """The broker URL with the vhost spelled out (Java reads a bare "/" as vhost "")."""
    parts = urllib.parse.urlsplit(broker_url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/%2f")
    return urllib.parse.urlunsplit(parts)


def run_client(command: list[str], *args: str) -> list[dict[str, Any]]:
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=90)
    if done.returncode != 0:
        raise AssertionError(f"{command[0]} {args[0]} failed:\n{done.stderr}")
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    name = f"interop-{uuid.uuid4().hex[:12]}"
    yield name

    async def delete() -> None:
        async with connect(broker_url) as conn, conn.channel() as ch:
            for suffix in ("", ".dlq", f".retry.{RETRY_LATER_MS}", ".retry.100"):
                await ch.queue_delete(name + suffix)

    anyio.run(delete)


# -- the typed view --------------------------------------------------------------------


def python_value(node: Node) -> Any:
    """What a handler must see for a value a client sent (the README's table)."""
    t, v = node["t"], node["v"]
    if t == "t":
        return v
    if t in "bBsuIilL":
        return int(v)
    if t in "fd":
        return struct.unpack(">f" if t == "f" else ">d", bytes.fromhex(v))[0]
    if t == "D":
        return decimal.Decimal(int(v[1])).scaleb(-v[0])
    if t == "S":
        raw = bytes.fromhex(v)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if t == "x":
        return bytearray.fromhex(v)
    if t == "T":
        try:
            return EPOCH + datetime.timedelta(seconds=int(v))
        except OverflowError:
            return Timestamp(int(v))
    if t == "F":
        return {key: python_value(item) for key, item in v.items()}
    if t == "A":
        return [python_value(item) for item in v]
    assert t == "V", node
    return None


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types throughout; floats bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return bool(a == b)


PROPERTIES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
)


def check_handler_view(msg: sc.Message, sent: dict[str, Any]) -> None:
    ours = {k: v for k, v in msg.headers.items() if k.startswith("x-")}
    theirs = {k: v for k, v in msg.headers.items() if k not in ours}
    expected = {k: python_value(v) for k, v in sent["headers"].items()}
    wrong = {k: (theirs.get(k), v) for k, v in expected.items() if not same(theirs.get(k), v)}
    assert not wrong, f"the handler saw (got, sent): {wrong}"
    assert theirs.keys() == expected.keys()
    assert msg.body == bytes.fromhex(sent["body"])
    for name in PROPERTIES:
        if name not in sent:
            continue
        want = sent[name] if name != "cluster_id" else sent[name] or ""
        if msg.attempt > 1:  # a retry copy: persistent, without expiration
            want = {"delivery_mode": 2, "expiration": None}.get(name, want)
        assert getattr(msg.properties, name) == want, name
    assert msg.timestamp == python_value({"t": "T", "v": sent["timestamp"]})


def check_copy(copy: dict[str, Any], sent: dict[str, Any], added: dict[str, Node]) -> None:
    """A retry or dead-letter copy as a client read it: every original header with its
    wire type, the ``x-*`` headers in ``added`` (a None value: any string)."""
    headers = copy["headers"]
    changed = {k: (headers.get(k), v) for k, v in sent["headers"].items() if headers.get(k) != v}
    assert not changed, f"the copy changed (copy, original): {changed}"
    for key, node in added.items():
        assert headers[key]["t"] == node["t"], key
        if node["v"] is not None:
            assert headers[key]["v"] == node["v"], key
    # the broker's own record of the hop back from the retry queue (TTL dead-lettering),
    # and the count a quorum retry queue adds to a basic.get (0, RabbitMQ 3.10 only)
    broker = {k for k in headers if k == "x-death" or k.startswith(("x-first-", "x-last-"))}
    if "x-delivery-count" in headers and "x-delivery-count" not in sent["headers"]:
        assert headers["x-delivery-count"]["v"] in ("0", 0), headers["x-delivery-count"]
        broker.add("x-delivery-count")
    assert headers.keys() - broker == sent["headers"].keys() | added.keys()
    for name in PROPERTIES:
        if name in sent:
            expected = {"delivery_mode": 2, "expiration": None}.get(name, sent[name])
            assert copy[name] == expected, name
    assert copy["timestamp"] == sent["timestamp"]
    assert copy["body"] == sent["body"]


def text(value: str) -> Node:
    return {"t": "S", "v": value.encode().hex()}


ANY_TEXT: Node = {"t": "S", "v": None}


@pytest.mark.parametrize("client", CLIENTS)
async def test_what_a_client_sends_reaches_the_handler_and_survives_the_copies(
    client: str, clients: dict[str, list[str]], broker_url: str, queue: str
) -> None:
    started = time.monotonic()
    seen: list[sc.Message] = []
    all_seen = anyio.Event()
    app = sc.App(url=broker_url, grace_period=5.0)

    @app.consumer(queue, retry=sc.Retry(delays=(0.1,)), timeout=10.0)
    async def handler(msg: sc.Message) -> None:
        seen.append(msg)
        if len(seen) == 3:
            all_seen.set()
        if msg.message_id == "retry":
            raise sc.RetryLater(delay=RETRY_LATER)
        raise RuntimeError("interop failure")

    url = client_url(broker_url)
    async with app.running():
        sent_dlq, sent_retry = await anyio.to_thread.run_sync(
            run_client, clients[client], "publish", url, queue, "dlq", "retry"
        )
        with anyio.fail_after(30):
            await all_seen.wait()
        [dead] = await anyio.to_thread.run_sync(
            run_client, clients[client], "read", url, f"{queue}.dlq", "1"
        )
        [retried] = await anyio.to_thread.run_sync(
            run_client, clients[client], "read", url, f"{queue}.retry.{RETRY_LATER_MS}", "1"
        )

    by_attempt = {(m.message_id, m.attempt): m for m in seen}
    assert by_attempt.keys() == {("dlq", 1), ("dlq", 2), ("retry", 1)}
    for (message_id, _), msg in by_attempt.items():
        check_handler_view(msg, sent_dlq if message_id == "dlq" else sent_retry)

    route = {"x-original-exchange": text(""), "x-original-routing-key": text(queue)}
    check_copy(retried, sent_retry, {"x-attempt": {"t": "b", "v": "2"}, **route})
    check_copy(
        dead,
        sent_dlq,
        {
            "x-attempt": {"t": "b", "v": "2"},
            "x-error-type": text("RuntimeError"),
            "x-error-message": text("interop failure"),
            "x-failed-queue": text(queue),
            "x-failed-at": ANY_TEXT,
            **route,
        },
    )
    assert time.monotonic() - started < 60


# -- ours to them ------------------------------------------------------------------------


def ts(seconds: int) -> datetime.datetime | Timestamp:
    try:
        return EPOCH + datetime.timedelta(seconds=seconds)
    except OverflowError:
        return Timestamp(seconds)


def node(t: str, v: Any) -> Node:
    return {"t": t, "v": v}


def integer(t: str, value: int) -> Node:
    return node(t, str(value))


def double(value: float) -> Node:
    return node("d", struct.pack(">d", value).hex())


def timestamp(seconds: int) -> Node:
    return node("T", str(seconds))


# Every Python header type at its limits -> the wire type every client must read.
OURS: dict[str, tuple[Any, Node]] = {
    "true": (True, node("t", True)),
    "false": (False, node("t", False)),
    "int -128": (-128, integer("b", -128)),
    "int 127": (127, integer("b", 127)),
    "int 128": (128, integer("s", 128)),
    "int -32768": (-32768, integer("s", -32768)),
    "int 32767": (32767, integer("s", 32767)),
    "int 32768": (32768, integer("I", 32768)),
    "int 65535": (65535, integer("I", 65535)),
    "int -2**31": (-(2**31), integer("I", -(2**31))),
    "int 2**31-1": (2**31 - 1, integer("I", 2**31 - 1)),
    "int 2**31": (2**31, integer("l", 2**31)),
    "int 2**32-1": (2**32 - 1, integer("l", 2**32 - 1)),
    "int -2**63": (-(2**63), integer("l", -(2**63))),
    "int 2**63-1": (2**63 - 1, integer("l", 2**63 - 1)),
    "float 0.1": (0.1, double(0.1)),
    "float -0.0": (-0.0, double(-0.0)),
    "float max": (1.7976931348623157e308, double(1.7976931348623157e308)),
    "decimal": (decimal.Decimal("-123.45"), node("D", [2, "-12345"])),
    "decimal max": (decimal.Decimal(2**31 - 1), node("D", [0, str(2**31 - 1)])),
    "str": ("héllo ✓", text("héllo ✓")),
    "str empty": ("", text("")),
    "bytes": (b"\x00\xff", node("x", "00ff")),
    "bytearray": (bytearray(b"\x01"), node("x", "01")),
    "datetime 1970": (ts(0), timestamp(0)),
    "datetime 2**32-1": (ts(2**32 - 1), timestamp(2**32 - 1)),
    "datetime 2**32": (ts(2**32), timestamp(2**32)),
    "datetime 2200": (ts(7258118400), timestamp(7258118400)),
    "datetime 9999": (ts(253402300799), timestamp(253402300799)),
    "datetime 1969": (ts(-1), timestamp(-1)),
    "Timestamp 10000": (ts(253402300800), timestamp(253402300800)),
    "Timestamp int64 max": (Timestamp(2**63 - 1), timestamp(2**63 - 1)),
    "None": (None, node("V", None)),
    "dict": (
        {"n": {"deep": [1, "a"]}, "e": {}},
        node(
            "F",
            {
                "n": node("F", {"deep": node("A", [integer("b", 1), text("a")])}),
                "e": node("F", {}),
            },
        ),
    ),
    "list": (
        [40000, 0.5, None, [], {"k": b"v"}],
        node(
            "A",
            [
                integer("I", 40000),
                double(0.5),
                node("V", None),
                node("A", []),
                node("F", {"k": node("x", "76")}),
            ],
        ),
    ),
}

# What a client cannot read as it was sent: key -> reason.
LOSSES: dict[str, dict[str, str]] = {
    "java": {
        "Timestamp int64 max": "Java reads a timestamp into a Date of milliseconds in a "
        "long: seconds * 1000 overflows beyond 2**63/1000 s",
    },
    "go": {},
    "node": {},
}


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_client_reads_what_strictconsume_publishes(
    client: str, clients: dict[str, list[str]], broker_url: str, queue: str
) -> None:
    headers = {key: value for key, (value, _) in OURS.items()}
    properties = Properties(
        content_type="application/json",
        content_encoding="identity",
        headers=headers,
        delivery_mode=2,
        priority=9,
        correlation_id="corr-py",
        reply_to="reply-py",
        expiration="3600000",
        message_id="all-properties",
        timestamp=datetime.datetime(2200, 1, 1, tzinfo=datetime.UTC),
        message_type="interop.test",
        user_id="guest",
        app_id="strictconsume",
    )
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        await ch.queue_declare(queue, durable=True)
        await ch.publish(b"{}", routing_key=queue, properties=properties, mandatory=True)
    app = sc.App(url=broker_url)
    async with app.publisher() as pub:
        await pub.publish(b"[]", routing_key=queue, headers=headers, message_id="publisher")
    url = client_url(broker_url)
    got = await anyio.to_thread.run_sync(run_client, clients[client], "read", url, queue, "2")
    by_id = {message["message_id"]: message for message in got}
    losses = LOSSES[client]
    for message in got:
        wrong = {
            key: (message["headers"].get(key), expected)
            for key, (_, expected) in OURS.items()
            if key not in losses and message["headers"].get(key) != expected
        }
        assert not wrong, f"{client} read (got, expected): {wrong}"
    full = by_id["all-properties"]
    for name in PROPERTIES:
        if name in full and name != "cluster_id":
            assert full[name] == getattr(properties, name), name
    assert full["timestamp"] == "7258118400"
    assert by_id["publisher"]["delivery_mode"] == 2
