"""deploy/systemd and deploy/kubernetes: what can be checked without a cluster.

The manifests parse; the command they run is one the CLI accepts, with settings that
resolve; the probes ask the paths the App serves, on the port its ``--http`` binds;
the time before SIGKILL is above the grace period; and ``systemd-analyze verify``
accepts the unit (with the paths of this machine put in, since it checks that the
program exists).
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

import strictconsume as sc
from strictconsume._cli import _parser
from strictconsume._http import parse_address
from strictconsume._settings import resolve_settings

from ..framework.test_observability import call
from .promtool import DEPLOY

UNIT = DEPLOY / "systemd" / "strictconsume@.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "strictconsume.env.example"
DEPLOYMENT = DEPLOY / "kubernetes" / "deployment.yaml"


def _paths_served() -> dict[str, int]:
    """What the App's ASGI app answers on each health path while not running (404 would
    mean the path is not served)."""
    app = sc.App()
    asgi = app.asgi()

    async def statuses() -> dict[str, int]:
        return {path: (await call(asgi, path))[0] for path in ("/health/live", "/health/ready")}

    return anyio.run(statuses)


def _deployment() -> tuple[dict[str, Any], dict[str, Any]]:
    documents = list(yaml.safe_load_all(DEPLOYMENT.read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    assert set(kinds) == {"Deployment", "PodDisruptionBudget"}
    deployment = kinds["Deployment"]
    pdb = kinds["PodDisruptionBudget"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    return deployment, deployment["spec"]["template"]["spec"]


def test_the_deployment_runs_the_cli_and_probes_what_it_serves() -> None:
    deployment, pod = _deployment()
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "strictconsume"]
    args = _parser().parse_args(container["args"])
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert {e["name"] for e in container["env"] if "valueFrom" in e} == {"STRICTCONSUME_URL"}
    settings = resolve_settings({}, env, {"http": args.http, "log_format": args.log_format})
    assert settings.http is not None
    _, http_port = parse_address(settings.http)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    served = _paths_served()
    for probe, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports[get["port"]] == http_port
        assert served[path] == 503  # served (not 404): 503 as the App is not running
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(http_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["terminationGracePeriodSeconds"] > settings.grace_period + 5


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    return unit


def test_the_unit_runs_the_cli_with_its_environment_file_and_outlasts_the_grace() -> None:
    service = _unit()["Service"]
    program, *rest = service["ExecStart"].split()
    assert rest == ["-m", "strictconsume", "$STRICTCONSUME_APP"]
    assert program.endswith("/python")
    assert service["EnvironmentFile"] == "/etc/strictconsume/%i.env"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the main process only
    assert set(service["RestartPreventExitStatus"].split()) == {"1", "2"}
    env = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    app_target = env.pop("STRICTCONSUME_APP")
    assert _parser().parse_args([app_target]).target == "shop.consumers:app"
    settings = resolve_settings({}, env)
    assert len(settings.urls) == 3
    assert int(service["TimeoutStopSec"]) > settings.grace_period + 5


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for old, new in (
        ("=/opt/strictconsume/venv/bin/python ", f"={sys.executable} "),
        ("=/etc/strictconsume/%i.env", f"={tmp_path}/%i.env"),
        ("=/opt/strictconsume/app", f"={tmp_path}"),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    shutil.copy(ENV_EXAMPLE, tmp_path / "orders.env")
    unit = tmp_path / "strictconsume@orders.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # it only warns (exit 0) about a directive it cannot parse: no output is the check
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
