"""scripts/dev-prometheus: its lifecycle commands and its errors (the server itself is
used by test_prometheus.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .promtool import ALERTS, ensure_prometheus
from .test_prometheus import DEV_PROMETHEUS, free_port

pytestmark = pytest.mark.services


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEV_PROMETHEUS), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def server() -> Iterator[list[str]]:
    if os.environ.get("STRICTCONSUME_PROMETHEUS_URL"):
        pytest.skip("STRICTCONSUME_PROMETHEUS_URL is set: nothing is started")
    ensure_prometheus()
    args = ["--name", f"t{uuid.uuid4().hex[:8]}", "--port", str(free_port())]
    try:
        yield args
    finally:
        run(*args, "purge")


def test_start_reload_status_stop(server: list[str], tmp_path: Path) -> None:
    assert run(*server, "status").returncode == 3
    started = run(*server, "start", "--interval", "1s")
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert url == f"http://127.0.0.1:{server[3]}"
    directory = Path(run(*server, "dir").stdout.strip())
    assert directory.parent.parent == Path("/var/tmp/strictconsume")
    assert (directory / "prometheus.yml").read_text().count("job_name: strictconsume") == 1
    assert httpx.get(f"{url}/api/v1/rules").json()["data"]["groups"] == []
    # a second start rewrites the configuration and reloads it in the same process
    again = run(*server, "start", "--rules", str(ALERTS), "--interval", "1s")
    assert again.returncode == 0, again.stderr
    assert "configuration reloaded" in again.stderr
    groups = httpx.get(f"{url}/api/v1/rules").json()["data"]["groups"]
    assert [group["name"] for group in groups] == ["strictconsume"]
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: sum(\n")
    refused = run(*server, "start", "--rules", str(broken))
    assert refused.returncode == 1
    assert "prometheus refused the configuration" in refused.stderr
    assert run(*server, "status").returncode == 0
    assert run(*server, "stop").returncode == 0
    assert run(*server, "status").returncode == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/-/ready")


def test_bad_arguments_and_a_port_in_use_are_clear_errors(server: list[str]) -> None:
    bad = run(*server, "start", "--interval", "soon")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert "--interval must be a duration such as 1s" in bad.stderr
    missing = run(*server, "start", "--rules", "/nonexistent/rules.yml")
    assert "--rules /nonexistent/rules.yml: no such file" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = run("--name", server[1], "--port", port, "start")
    assert busy.returncode == 1
    assert f"127.0.0.1:{port} is in use by another program" in busy.stderr
