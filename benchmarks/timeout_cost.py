"""What a handler's timeout costs per call: a deadline of its own (a cancel scope with
a deadline: trio's deadline heap, asyncio's timer handles) against the channel's
:class:`~strictconsume._handler.TimeoutWatcher` (a scope without a deadline and a
deque append), without a broker.

usage: .venv/bin/python benchmarks/timeout_cost.py [--calls 20000] [--concurrency 100]
                                                   [--repeat 7] [--backend trio,asyncio]

``--concurrency`` tasks call ``call_handler`` in turn, ``--calls`` in all, on a
handler that returns at once (``noop``) or yields to the loop once (``yield``), as
the dispatcher calls it (``started`` read just before, a 60 s timeout). The two ways
alternate, trial after trial, in one process, so that a busy neighbour weighs on both
alike; printed: the CPU time per call (``time.process_time``, which leaves out the
time the process waited for a core) of each, median and best of ``--repeat``, and
the difference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio
import anyio.lowlevel

import strictconsume as sc
from strictconsume._handler import TimeoutWatcher, call_handler
from strictconsume._native import Native
from strictconsume._pipeline import build_pipeline
from strictconsume.testing import _make_message, _spec_of


async def trial(workload: str, watched: bool, calls: int, concurrency: int) -> float:
    """CPU seconds per call of ``calls`` calls, ``concurrency`` at a time."""

    async def noop(msg: sc.Message) -> None:
        return

    async def yielding(msg: sc.Message) -> None:
        await anyio.lowlevel.checkpoint()

    spec = _spec_of(noop if workload == "noop" else yielding, "bench", 60.0, None)
    pipeline = build_pipeline(spec)
    msg = _make_message(spec, b"x")
    native = Native()
    watcher = TimeoutWatcher(native) if watched else None
    per_task = calls // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await call_handler(
                spec,
                msg,
                pipeline=pipeline,
                started=native.current_time(),
                native=native,
                timeouts=watcher,
            )

    async with anyio.create_task_group() as tg:
        if watcher is not None:
            tg.start_soon(watcher.run)
        began = time.process_time()
        async with anyio.create_task_group() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker)
        spent = time.process_time() - began
        tg.cancel_scope.cancel()
    return spent / (per_task * concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--backend", default="trio,asyncio")
    parser.add_argument("--workload", default="noop,yield")
    ns = parser.parse_args()
    for backend in ns.backend.split(","):
        for workload in ns.workload.split(","):
            seen: dict[bool, list[float]] = {False: [], True: []}
            for rep in range(ns.repeat):
                for watched in (False, True) if rep % 2 == 0 else (True, False):
                    cost: Any = anyio.run(
                        trial, workload, watched, ns.calls, ns.concurrency, backend=backend
                    )
                    seen[watched].append(cost * 1e6)
            own, watcher = seen[False], seen[True]
            print(
                f"{backend:8} {workload:6} us CPU per call: deadline of its own "
                f"{statistics.median(own):6.2f} (best {min(own):.2f}), watcher "
                f"{statistics.median(watcher):6.2f} (best {min(watcher):.2f}); "
                f"difference {statistics.median(own) - statistics.median(watcher):+.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
