"""The broker every benchmark uses: ``STRICTCONSUME_URL`` / ``AMQP_URL`` when set,
otherwise a private node of ``scripts/dev-broker`` (started if needed).

The node is the one ``scripts/dev-broker`` would pick (``STRICTCONSUME_BROKER_NAME`` /
``STRICTCONSUME_BROKER_PORT``, default ``dev`` on 5673) unless a :class:`Node` names
another one, so that a benchmark can run on a node of its own beside a test suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEV_BROKER = REPO / "scripts" / "dev-broker"


def external_url() -> str | None:
    """The outside broker from the environment, if any (rabbitmqctl cannot reach it)."""
    return os.environ.get("STRICTCONSUME_URL") or os.environ.get("AMQP_URL") or None


@dataclass(frozen=True)
class Node:
    """A private node of scripts/dev-broker; ``None`` fields mean dev-broker's default."""

    name: str | None = None
    port: int | None = None

    def command(self, *args: str) -> list[str]:
        """The dev-broker command line for this node (options before the subcommand)."""
        cmd = [sys.executable, str(DEV_BROKER)]
        if self.name is not None:
            cmd += ["--name", self.name]
        if self.port is not None:
            cmd += ["--port", str(self.port)]
        return [*cmd, *args]

    def running(self) -> bool:
        return subprocess.run(self.command("status"), capture_output=True).returncode == 0

    def start(self) -> str:
        """Start the node (a no-op when it runs) and return its URL."""
        out = subprocess.run(self.command("start"), check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        subprocess.run(self.command("stop"), check=True, capture_output=True)

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl ARGS`` against this node; its standard output."""
        out = subprocess.run(self.command("ctl", *args), check=True, capture_output=True, text=True)
        return out.stdout


def broker_url(node: Node | None = None) -> str:
    url = external_url()
    if url:
        return url
    return (node or Node()).start()
