"""The private broker: it comes up, an independent client uses it, and the script's
lifecycle commands do what they say."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from .conftest import DEV_BROKER, dev_broker, external_broker_url, free_node_port

pytestmark = pytest.mark.broker


def test_independent_client_round_trips_a_message(broker_url: str) -> None:
    params = pika.URLParameters(broker_url)
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        queue = f"test-dev-broker-{uuid.uuid4().hex}"
        channel.queue_declare(queue, auto_delete=False, durable=False)
        channel.confirm_delivery()
        body = b"hello from pika " + uuid.uuid4().bytes
        channel.basic_publish("", queue, body, mandatory=True)
        method, _properties, got = channel.basic_get(queue, auto_ack=True)
        assert method is not None, "the published message was not in the queue"
        assert got == body
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
        channel.queue_delete(queue)
    finally:
        connection.close()


@pytest.fixture
def private_node() -> Iterator[tuple[str, int]]:
    """A second private node, separate from the session's broker; always stopped."""
    if external_broker_url() is not None:
        pytest.skip("dev-broker starts nothing when STRICTCONSUME_URL/AMQP_URL is set")
    name = f"t{uuid.uuid4().hex[:8]}"
    port = free_node_port()
    try:
        yield name, port
    finally:
        dev_broker("--name", name, "--port", str(port), "stop", check=False)


def _pid_of(name: str, port: int) -> str:
    status = dev_broker("--name", name, "--port", str(port), "status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    return status.stdout.split("(pid ", 1)[1].split(")", 1)[0]


@pytest.mark.slow
def test_start_twice_gives_one_broker_and_stop_stops_it(private_node: tuple[str, int]) -> None:
    name, port = private_node
    args = ("--name", name, "--port", str(port))
    first = dev_broker(*args, "start")
    assert first.stdout.strip() == f"amqp://guest:guest@127.0.0.1:{port}/"
    pid = _pid_of(name, port)

    second = dev_broker(*args, "start")
    assert second.stdout.strip() == first.stdout.strip()
    assert _pid_of(name, port) == pid, "a second start must reuse the running node"
    assert "ready" not in second.stderr, "a second start must not boot another node"

    dev_broker(*args, "stop")
    status = dev_broker(*args, "status", check=False)
    assert status.returncode == 3
    assert status.stdout.splitlines()[0] == "stopped"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the AMQP port still answers"


@pytest.mark.slow
def test_a_clone_the_broker_user_cannot_traverse_runs_a_node(tmp_path: Path) -> None:
    """A root user clones into /root (mode 700): the node's files must live where user
    rabbitmq reaches them, and start must print the URL alone on stdout."""
    if external_broker_url() is not None:
        pytest.skip("dev-broker starts nothing when STRICTCONSUME_URL/AMQP_URL is set")
    private = tmp_path / "home"
    (private / "clone" / "scripts").mkdir(parents=True)
    private.chmod(0o700)
    script = private / "clone" / "scripts" / "dev-broker"
    shutil.copy(DEV_BROKER, script)
    port = free_node_port()
    args = (sys.executable, str(script), "--name", "private", "--port", str(port))
    try:
        started = subprocess.run(
            [*args, "start"], capture_output=True, text=True, timeout=120, check=False
        )
        assert started.returncode == 0, started.stderr
        assert started.stdout == f"amqp://guest:guest@127.0.0.1:{port}/\n"
        directory = subprocess.run(
            [*args, "dir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert not directory.startswith(str(private)), directory
        assert "/var/tmp/strictconsume/clone-" in directory, directory
        status = subprocess.run([*args, "status"], capture_output=True, text=True, check=False)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"files: {directory}" in status.stdout.splitlines()
        # Another clone's node of the same name is another node, in another directory.
        assert directory != dev_broker("--name", "private", "dir").stdout.strip()
    finally:
        subprocess.run([*args, "purge"], capture_output=True, check=False, timeout=120)
    assert not Path(directory).exists(), "purge leaves the node's directory behind"


def test_taken_port_gives_a_clear_error_naming_it(private_node: tuple[str, int]) -> None:
    name, port = private_node
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = dev_broker("--name", name, "--port", str(port), "start", check=False)
    assert result.returncode != 0
    assert f"port {port}" in result.stderr
    assert "already in use" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("env_url", "shown"),
    [
        ("amqp://someone:s3cret@broker.invalid:5672/%2F", "someone:***@broker.invalid:5672/%2F"),
        ("amqp://someone:se/cret@broker.invalid/vh", "someone:***@broker.invalid/vh"),
        ("amqp://someone:sec@ret@broker.invalid/", "someone:***@broker.invalid/"),
    ],
)
def test_url_prefers_the_environment(env_url: str, shown: str) -> None:
    env = {**os.environ, "STRICTCONSUME_URL": env_url}
    result = subprocess.run(
        [sys.executable, str(DEV_BROKER), "url"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert result.stdout.strip() == env_url
    status = subprocess.run(
        [sys.executable, str(DEV_BROKER), "status"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert status.returncode == 0
    assert "cret" not in status.stdout, "status must not print any part of the password"
    assert f"using the broker at amqp://{shown} (from the environment)" in status.stdout
