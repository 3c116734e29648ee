"""The table of ``tests/README.md`` from the JSON lines the fault tests wrote:

STRICTCONSUME_FAULT_REPORT=/tmp/faults.jsonl .venv/bin/python -m pytest tests/faults
.venv/bin/python -m tests.faults.report /tmp/faults.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def table(lines: list[dict[str, Any]]) -> str:
    rows = [
        "| fault | backend | injected | published | finished | dead-lettered | duplicated "
        "| lost | time to recover (s) |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for report in lines:
        recover = [float(x) for x in report["recover_s"]]
        if len(recover) > 1:
            spent = f"max {max(recover):.2f}, mean {sum(recover) / len(recover):.2f}"
        elif recover:
            spent = f"{recover[0]:.2f}"
        else:
            spent = "-"
        rows.append(
            f"| {report['fault']} | {report['backend']} | {report['injected']} "
            f"| {report['published']} | {report['finished']} | {report['dead_lettered']} "
            f"| {report['duplicated']} | {report['lost']} | {spent} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    text = Path(argv[0]).read_text(encoding="utf-8")
    print(table([json.loads(line) for line in text.splitlines() if line.strip()]))


if __name__ == "__main__":
    main(sys.argv[1:])
