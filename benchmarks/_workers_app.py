"""The App of the ``--workers`` runs of benchmarks/run.py (see ``_workers.py``)::

    BENCH_WORKERS_QUEUE=q BENCH_WORKERS_RECORD=dir \
        python -m strictconsume _workers_app:app --workers 2 --prefetch 100

Its handler does nothing but note, per process, when the first handler started, when
the last one ended (``CLOCK_MONOTONIC``, which every process of the machine shares) and
how many ran; each process writes them to ``<record>/<pid>.json`` when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

import strictconsume as sc
from _consumers import HANDLER_TIMEOUT

QUEUE = os.environ["BENCH_WORKERS_QUEUE"]
RECORD = Path(os.environ["BENCH_WORKERS_RECORD"])

app = sc.App()
seen = {"count": 0, "first": 0.0, "last": 0.0}


@app.consumer(QUEUE, timeout=HANDLER_TIMEOUT)
async def handle(msg: sc.Message) -> None:
    if not seen["count"]:
        seen["first"] = time.monotonic()
    seen["count"] += 1
    seen["last"] = time.monotonic()


@atexit.register
def _write() -> None:
    (RECORD / f"{os.getpid()}.json").write_text(json.dumps(seen))
