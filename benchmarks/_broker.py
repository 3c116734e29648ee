"""The broker every benchmark uses: ``STRICTCONSUME_URL`` / ``AMQP_URL`` when set,
otherwise the private node of ``scripts/dev-broker`` (started if needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEV_BROKER = REPO / "scripts" / "dev-broker"


def broker_url() -> str:
    url = os.environ.get("STRICTCONSUME_URL") or os.environ.get("AMQP_URL")
    if url:
        return url
    out = subprocess.run(
        [sys.executable, str(DEV_BROKER), "start"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()
