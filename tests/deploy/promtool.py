"""Debian's prometheus package for the deploy tests: promtool and the server, installed
on demand (as root, with scripts/apt-install), as CI's fresh machine needs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..conftest import REPO

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "strictconsume.json"
PROMTOOL = Path("/usr/bin/promtool")  # Debian's, not a build in /usr/local/bin


def ensure_prometheus() -> Path:
    """The path of Debian's promtool, installing the prometheus package if missing."""
    if not PROMTOOL.exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise RuntimeError("Debian's prometheus package is missing: apt-get install prometheus")
        subprocess.run(
            [str(REPO / "scripts" / "apt-install"), "prometheus"],
            check=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
    return PROMTOOL


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ensure_prometheus()), *args], capture_output=True, text=True, timeout=60, check=False
    )
