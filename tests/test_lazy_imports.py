"""What a plain App loads: nothing that only an optional feature needs.

A consumer's memory is mostly the modules it imports (benchmarks/README.md, "Memory"),
so the modules of features an App does not use load on first use. Each test runs a
fresh interpreter, since this one has loaded everything already, and lists the
optional modules it finds in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

#: Modules only an optional feature needs: the metrics and HTTP server, tracing,
#: settings files, the idempotency stores, the command line and the worker
#: supervisor, typed bodies' libraries, the outbox, the dead-letter tool.
OPTIONAL = (
    "prometheus_client",
    "opentelemetry",
    "sqlite3",
    "tomllib",
    "psycopg",
    "redis",
    "pydantic",
    "msgspec",
    "argparse",
    "http.server",
    "email",
    "strictconsume._cli",
    "strictconsume._worker",
    "strictconsume._workers",
    "strictconsume._http",
    "strictconsume._asgi",
    "strictconsume._dlq_tool",
    "strictconsume.idempotency._sqlite",
    "strictconsume.outbox",
    "strictconsume.testing",
)
#: The other backend's library: an App on trio does not load asyncio, nor one on
#: asyncio trio.
OTHER_BACKEND = {"trio": "asyncio", "asyncio": "trio"}


def loaded_by(code: str, *args: str) -> set[str]:
    """The modules loaded after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def optional_in(modules: set[str], backend: str) -> list[str]:
    heavy = (*OPTIONAL, OTHER_BACKEND[backend])
    return sorted(m for m in modules if m in heavy or m.startswith(tuple(f"{h}." for h in heavy)))


def test_the_check_sees_an_optional_module() -> None:
    """The subprocess's list is real: a module imported there shows up, with its
    submodules, so that the tests below can fail."""
    modules = loaded_by("import tomllib, json.decoder")
    assert "json.decoder" in modules
    assert {"tomllib", "tomllib._parser"} <= set(optional_in(modules, "trio"))
    assert "json.decoder" not in optional_in(modules, "trio")
    assert optional_in({"asyncio.events"}, "trio") == ["asyncio.events"]
    assert optional_in({"asyncio.events"}, "asyncio") == []


# The handler of a built App, run through strictconsume.testing's run_handler (the
# same pipeline and handler call as the dispatcher) and then dropped from sys.modules,
# as testing is a helper for users' tests, not part of a running App.
BUILD_AND_HANDLE = """
import sys
import anyio
import strictconsume as sc

app = sc.App("amqp://guest:guest@127.0.0.1:1/")
seen = []

@app.consumer("orders", prefetch=100, timeout=30.0)
async def handle(msg: sc.Message) -> None:
    seen.append(msg.json())

handle.__annotations__["msg"] = sc.Message

async def main() -> None:
    from strictconsume.testing import run_handler
    result = await run_handler(handle, b'{"id": 1}')
    assert result.outcome == "ack", result

anyio.run(main, backend=sys.argv[1])
assert seen == [{"id": 1}], seen
for name in [m for m in sys.modules if m == "strictconsume.testing"]:
    del sys.modules[name]
"""


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_built_app_handling_a_message_loads_no_optional_module(backend: str) -> None:
    modules = loaded_by(BUILD_AND_HANDLE, backend)
    assert "strictconsume._app" in modules
    assert "strictconsume._dispatch" in modules
    assert optional_in(modules, backend) == []


RUN_APP = """
import sys
import anyio
import strictconsume as sc

backend, url, queue = sys.argv[1:4]
app = sc.App(url)

@app.consumer(queue, prefetch=10, timeout=30.0)
async def handle(msg: sc.Message) -> None:
    pass

async def main() -> None:
    async with app.running():
        async with app.publisher() as pub:
            await pub.publish(b"{}", routing_key=queue)
        with anyio.fail_after(20):
            while app.outcomes[queue, "ack"] < 1:
                await anyio.sleep(0.01)

anyio.run(main, backend=backend)
"""


@pytest.mark.broker
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_an_app_running_on_the_broker_loads_no_optional_module(
    backend: str, broker_url: str
) -> None:
    """The whole App: connection, topology, the consumer, an ack, a publish through
    ``app.publisher()`` and a graceful stop."""
    import strictconsume as sc
    from strictconsume._retry import dead_letter_queue_name, retry_queue_name

    from .amqp.oracle import pika_channel

    queue = f"lazy-imports-{backend}-{uuid.uuid4().hex[:8]}"
    try:
        modules = loaded_by(RUN_APP, backend, broker_url, queue)
        with pika_channel(broker_url) as ch:  # the oracle: the message was acked
            assert ch.queue_declare(queue, passive=True).method.message_count == 0
    finally:
        with pika_channel(broker_url) as ch:
            for delay in sc.Retry().delays:
                ch.queue_delete(retry_queue_name(queue, delay))
            ch.queue_delete(dead_letter_queue_name(queue))
            ch.queue_delete(queue)
    assert "strictconsume._supervisor" in modules
    assert optional_in(modules, backend) == []
