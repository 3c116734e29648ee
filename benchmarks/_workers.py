"""``--workers 2`` against one worker (benchmarks/run.py): the same App run by
``python -m strictconsume`` with ``--workers 1`` (one process, no supervisor) and
``--workers 2``, noop handler, on the same pre-filled queue.

The clock of a run is the App's own: from the first handler start in any worker to
the last handler end in any worker (``_workers_app.py`` notes them), so that neither
the interpreter's start nor the shutdown counts; the second worker may subscribe a
little after the first (``skew_s``), which the two-worker figure pays for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _consumers import BenchmarkError

HERE = Path(__file__).resolve().parent
DRAIN_TIMEOUT = 120.0


def queue_drained(url: str, queue: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until ``queue`` has no message ready (polling a passive declare)."""
    import anyio

    from strictconsume.amqp import connect

    async def main() -> None:
        async with connect(url) as conn, conn.channel() as ch:
            deadline = time.monotonic() + timeout
            while (await ch.queue_declare(queue, passive=True)).message_count:
                if proc.poll() is not None:
                    raise BenchmarkError(f"the App exited ({proc.returncode}) before draining")
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"{queue!r} not drained within {timeout:g} s")
                await anyio.sleep(0.05)

    anyio.run(main, backend="trio")


def workers_run(url: str, queue: str, workers: int, prefetch: int, n: int) -> dict[str, Any]:
    """Drain ``n`` messages already in ``queue`` with ``--workers workers``."""
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as record:
        env = dict(
            os.environ,
            STRICTCONSUME_URL=url,
            BENCH_WORKERS_QUEUE=queue,
            BENCH_WORKERS_RECORD=record,
            PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        )
        command = [sys.executable, "-m", "strictconsume", "_workers_app:app"]
        options = ["--workers", str(workers), "--prefetch", str(prefetch)]
        proc = subprocess.Popen(
            [*command, *options, "--log-level", "WARNING"],
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            queue_drained(url, queue, proc, DRAIN_TIMEOUT)
            time.sleep(0.3)  # the last handlers end and ack
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise BenchmarkError(
                f"--workers {workers} exited {proc.returncode}:\n{stderr.decode(errors='replace')}"
            )
        seen = [json.loads(p.read_text()) for p in Path(record).glob("*.json")]
    seen = [s for s in seen if s["count"]]
    handled = sum(s["count"] for s in seen)
    if handled != n:
        raise BenchmarkError(f"--workers {workers} handled {handled} of {n} messages")
    first = [s["first"] for s in seen]
    return {
        "elapsed": max(s["last"] for s in seen) - min(first),
        "skew_s": max(first) - min(first),
        "processes": len(seen),
        "messages": n,
    }
