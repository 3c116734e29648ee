"""Shared fixtures: the anyio backends and the real broker.

Every async test runs on trio and on asyncio (anyio's pytest plugin, parametrized by
``anyio_backend``). Tests that need trio's autojump clock pin the backend to
``("trio", {"clock": MockClock(autojump_threshold=0)})``.

Broker tests use the broker in ``STRICTCONSUME_URL`` / ``AMQP_URL`` when one is set,
otherwise the private node of ``scripts/dev-broker`` (started on demand; a second
start is a no-op, so running pytest directly works too).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .processes import Harness, Node

REPO = Path(__file__).resolve().parent.parent
DEV_BROKER = REPO / "scripts" / "dev-broker"


@pytest.fixture(
    params=[pytest.param("trio", id="trio"), pytest.param("asyncio", id="asyncio")],
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def external_broker_url() -> str | None:
    return os.environ.get("STRICTCONSUME_URL") or os.environ.get("AMQP_URL") or None


def dev_broker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run scripts/dev-broker with the given arguments and capture its output."""
    return subprocess.run(
        [sys.executable, str(DEV_BROKER), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def free_node_port(avoid: frozenset[int] | set[int] = frozenset()) -> int:
    """A port below 44000 whose +10000 and +20000 siblings are free too (a node's
    epmd and distribution ports), none of them in ``avoid``."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        candidates = {port, port + 10000, port + 20000}
        if port > 44000 or candidates & avoid:
            continue
        taken = False
        for candidate in candidates:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", candidate))
                except OSError:
                    taken = True
        if not taken:
            return port
    raise RuntimeError("no free port found")


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The AMQP URL of a running broker (started if needed, left running)."""
    url = external_broker_url()
    if url is None:
        url = dev_broker("start").stdout.strip()
    return url


def read_broker_version(url: str) -> tuple[int, int, int]:
    """The broker's version from its connection.start, read with pamqp over a plain
    socket (nothing of strictconsume's client), for tests that pin what a version
    does."""
    import pamqp.exceptions
    import pamqp.frame
    from pamqp import commands

    from strictconsume.amqp import parse_url
    from strictconsume.amqp._protocol import server_version

    params = parse_url(url)
    with socket.create_connection((params.host, params.port), timeout=10) as s:
        s.sendall(b"AMQP\x00\x00\x09\x01")
        data = b""
        while True:
            chunk = s.recv(65536)
            assert chunk, f"{params.url} closed the connection before connection.start"
            data += chunk
            try:
                _, _, start = pamqp.frame.unmarshal(data)
            except pamqp.exceptions.UnmarshalingException:
                continue
            break
    assert isinstance(start, commands.Connection.Start), start
    version = server_version(dict(start.server_properties or {}))
    assert version is not None, f"{params.url} does not say its version"
    return version


@pytest.fixture(scope="session")
def broker_version(broker_url: str) -> tuple[int, int, int]:
    """The version of the tests' broker, e.g. ``(4, 3, 6)``."""
    return read_broker_version(broker_url)


@pytest.fixture(scope="session")
def broker_ctl() -> None:
    """Skip the test when the broker is not ours to administer with rabbitmqctl."""
    if external_broker_url() is not None:
        pytest.skip("needs `scripts/dev-broker ctl`; the broker comes from STRICTCONSUME_URL")


@pytest.fixture
def harness(broker_url: str, tmp_path: Path) -> Iterator[Harness]:
    """A unique queue on the session's broker and the consumer processes of one test."""
    from .processes import Harness

    h = Harness(broker_url, f"test-process-{uuid.uuid4().hex}", tmp_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def own_node() -> Iterator[Node]:
    """A private node of our own, to close connections on and restart; always stopped."""
    from .processes import Node

    if external_broker_url() is not None:
        pytest.skip("restarts a private node; the broker comes from STRICTCONSUME_URL")
    node = Node(f"proc{uuid.uuid4().hex[:8]}", free_node_port())
    try:
        dev_broker(*node.args, "start")
        yield node
    finally:
        dev_broker(*node.args, "purge", check=False)


# -- PostgreSQL and Redis (tests marked `services`) ------------------------------------------

DEV_SERVICES = REPO / "scripts" / "dev-services"


def _service_url(name: str, env: str) -> Iterator[str]:
    """The URL of a running ``name`` server: ``env`` when set, else a private one of
    scripts/dev-services, started for the session and stopped after it if it was not
    running before."""
    url = os.environ.get(env)
    if url:
        yield url
        return
    was_running = (
        subprocess.run(
            [sys.executable, str(DEV_SERVICES), "status", name], capture_output=True, check=False
        ).returncode
        == 0
    )
    started = subprocess.run(
        [sys.executable, str(DEV_SERVICES), "start", name],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if started.returncode != 0:
        pytest.fail(f"scripts/dev-services start {name} failed:\n{started.stderr}")
    try:
        yield started.stdout.strip()
    finally:
        if not was_running:
            subprocess.run(
                [sys.executable, str(DEV_SERVICES), "stop", name], capture_output=True, check=False
            )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server's URL (STRICTCONSUME_POSTGRES_URL, or a private one)."""
    yield from _service_url("postgres", "STRICTCONSUME_POSTGRES_URL")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server's URL (STRICTCONSUME_REDIS_URL, or a private one)."""
    yield from _service_url("redis", "STRICTCONSUME_REDIS_URL")
