"""Where a consumer's baseline memory goes: resident memory after each import.

usage: .venv/bin/python benchmarks/import_memory.py [--repeat N]

Each configuration runs in a fresh interpreter, which imports its steps in turn and
reads VmRSS (Linux, /proc/self/status) after each; a step's figure is what it added
to the ones before it (a module a step shares with an earlier one counts there). The
steps are what the benchmark consumers of ``_consumers.py`` import before they
connect: for strictconsume, the client (``strictconsume.amqp``) and the framework as
an App with one consumer uses it (``strictconsume._app``), then the anyio backend the
App runs on; for aio-pika, ``aio_pika``. Prints a markdown table, the median of
``--repeat`` interpreters (default 5) for each figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

#: Each configuration: its steps, each a label and the modules it imports.
CONFIGURATIONS: dict[str, list[tuple[str, list[str]]]] = {
    "aio-pika": [
        ("ssl", ["ssl"]),
        ("asyncio", ["asyncio"]),
        ("aio_pika (aiormq, pamqp, yarl, ...)", ["aio_pika"]),
    ],
    "strictconsume-asyncio": [
        ("ssl", ["ssl"]),
        ("asyncio", ["asyncio"]),
        ("attrs", ["attrs"]),
        ("pamqp", ["pamqp.commands", "pamqp.frame"]),
        ("anyio", ["anyio"]),
        ("strictconsume.amqp (the client)", ["strictconsume.amqp"]),
        ("strictconsume._app (the framework)", ["strictconsume._app"]),
        ("anyio's asyncio backend", ["anyio._backends._asyncio"]),
    ],
    "strictconsume-trio": [
        ("ssl", ["ssl"]),
        ("trio", ["trio"]),
        ("attrs", ["attrs"]),
        ("pamqp", ["pamqp.commands", "pamqp.frame"]),
        ("anyio", ["anyio"]),
        ("strictconsume.amqp (the client)", ["strictconsume.amqp"]),
        ("strictconsume._app (the framework)", ["strictconsume._app"]),
        ("anyio's trio backend", ["anyio._backends._trio"]),
    ],
}

CHILD = """
import importlib, json, sys
def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
figures = [rss()]
for modules in json.loads(sys.argv[1]):
    for module in modules:
        importlib.import_module(module)
    figures.append(rss())
print(json.dumps([figures, len(sys.modules)]))
"""


def measure(steps: list[tuple[str, list[str]]]) -> tuple[list[float], int]:
    """VmRSS (MB) of a fresh interpreter at its start and after each step."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([modules for _, modules in steps])],
        capture_output=True,
        text=True,
        check=True,
    )
    figures, modules = json.loads(result.stdout)
    return figures, modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="interpreters per figure")
    args = parser.parse_args()
    print("| configuration | step | adds (MB) | total (MB) |")
    print("|---|---|--:|--:|")
    for name, steps in CONFIGURATIONS.items():
        runs = [measure(steps) for _ in range(args.repeat)]
        totals = [statistics.median(run[0][i] for run in runs) for i in range(len(steps) + 1)]
        print(f"| {name} | the interpreter | | {totals[0]:.1f} |")
        for i, (label, _) in enumerate(steps, start=1):
            print(f"| {name} | {label} | {totals[i] - totals[i - 1]:+.2f} | {totals[i]:.1f} |")
        print(f"| {name} | modules loaded | | {runs[0][1]} |")


if __name__ == "__main__":
    main()
