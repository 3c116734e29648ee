"""The suite's outputs: the JSON document, the markdown report and the plots.

See benchmarks/run.py for the JSON schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

OURS = ("strictconsume-trio", "strictconsume-asyncio")
PEERS = ("aio-pika", "aio-pika-iterator", "aiormq", "pika", "faststream")
CEILING = "broker-ceiling"
SLEEP = 0.01


def ideal(workload: str, prefetch: int) -> float | None:
    """The best a consumer can do on ``workload``: prefetch handlers each sleeping
    10 ms at once (the sleep10ms workload), or nothing to say (noop)."""
    return prefetch / SLEEP if workload == "sleep10ms" else None


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    rows: list[dict[str, Any]] = doc["throughput"]
    index = {(r["library"], r["workload"], r["prefetch"]): r for r in rows}
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    prefetches = sorted({r["prefetch"] for r in rows})
    out = [
        f"# Consume throughput: strictconsume and its peers ({meta['date']})",
        "",
        f"{meta['title']}. RabbitMQ {meta['rabbitmq']} on {meta['broker']}, Python "
        f"{meta['python']}, {meta['cpus']} CPUs; {meta['repeat']} repetition(s), "
        f"interleaved; {meta['runs']} runs in {meta['wall_s']:.0f} s. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        "Manual acks (one per message) but for broker-ceiling (auto-ack, pika, no "
        "handler). Durable queue, persistent 128-byte messages, pre-filled before every "
        "run. Messages per second, median (min-max); compare within this table only.",
    ]
    for workload in workloads:
        libs = [lib for lib in meta["libraries"] if (lib, workload, prefetches[0]) in index]
        out += ["", f"## Workload `{workload}`", ""]
        header = ["prefetch", "N", *libs]
        if workload == "sleep10ms":
            header.append("ideal (prefetch / 10 ms)")
        table = []
        for p in prefetches:
            ns = {index[lib, workload, p]["messages"] for lib in libs}
            cells = [str(p), "/".join(str(n) for n in sorted(ns, reverse=True))]
            for lib in libs:
                r = index[lib, workload, p]
                cells.append(f"{_rate(r['msgs_per_s'])} ({_rate(r['min'])}-{_rate(r['max'])})")
            best = ideal(workload, p)
            if best is not None:
                cells.append(_rate(best))
            table.append(cells)
        out += _table(header, table)
        if workload == "sleep10ms":
            out += [
                "",
                "The ideal assumes free message handling: where it exceeds what a library "
                "does with the noop handler (prefetch 1000, say), the noop figure bounds "
                "it instead.",
            ]
        if workload == "sleep10ms" and "pika" in libs:
            out += [
                "",
                "pika's blocking consumer runs one callback at a time, so its handler "
                "sleeps 10 ms per message whatever the prefetch (at most 100 msg/s); it "
                "drains fewer messages (the smaller N) to keep its runs short.",
            ]
        ours = [lib for lib in OURS if lib in libs]
        others = [lib for lib in libs if lib not in OURS]
        if ours and (others or workload == "sleep10ms"):
            out += [
                "",
                "Ratios of medians (strictconsume / other; above 1 strictconsume is faster"
                + ("; / ideal: the share of the ideal reached" if workload == "sleep10ms" else "")
                + "):",
                "",
            ]
            pairs = [(a, b) for a in ours for b in others]
            header = ["prefetch", *(f"{a.split('-')[1]} / {b}" for a, b in pairs)]
            if workload == "sleep10ms":
                header += [f"{a.split('-')[1]} / ideal" for a in ours]
            table = []
            for p in prefetches:
                cells = [str(p)]
                for a, b in pairs:
                    ratio = (
                        index[a, workload, p]["msgs_per_s"] / index[b, workload, p]["msgs_per_s"]
                    )
                    cells.append(f"{ratio:.2f}x")
                best = ideal(workload, p)
                if best is not None:
                    cells += [f"{index[a, workload, p]['msgs_per_s'] / best:.2f}" for a in ours]
                table.append(cells)
            out += _table(header, table)
        out += ["", "CPU time of the consumer process per message, µs (median):", ""]
        out += _table(
            ["prefetch", *libs],
            [
                [str(p), *(f"{index[lib, workload, p]['cpu_us_per_msg']:.0f}" for lib in libs)]
                for p in prefetches
            ],
        )
        out += ["", "Peak RSS of the consumer process, MB (VmHWM, the largest of the runs):", ""]
        out += _table(
            ["prefetch", *libs],
            [
                [str(p), *(f"{index[lib, workload, p]['peak_rss_mb']:.1f}" for lib in libs)]
                for p in prefetches
            ],
        )
    latency: list[dict[str, Any]] = doc["latency"]
    if latency:
        first = latency[0]
        out += [
            "",
            "## Latency: publish to handler start",
            "",
            f"{first['rate']:g} msg/s for {first['messages'] / first['rate']:g} s per run "
            f"(published one by one on a schedule, each body carrying its publish time), "
            f"prefetch {first['prefetch']}, `noop` handler, manual acks; all the runs' "
            "delays pooled. Milliseconds.",
            "",
        ]
        out += _table(
            ["library", "messages", "median", "p99", "max"],
            [
                [
                    r["library"],
                    str(r["messages"]),
                    f"{r['median_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    f"{r['max_ms']:.2f}",
                ]
                for r in latency
            ],
        )
    out += _workers_section(doc.get("workers") or [])
    if meta["notes"]:
        out += ["", "Notes:", "", *(f"- {note}" for note in meta["notes"])]
    return "\n".join(out) + "\n"


def _workers_section(rows: list[dict[str, Any]]) -> list[str]:
    """``--workers 2`` against one worker (``_workers.py``), when measured."""
    if len(rows) < 2:
        return []
    by = {r["workers"]: r for r in rows}
    out = [
        "",
        "## `python -m strictconsume --workers N`",
        "",
        f"The same App, `noop` handler, prefetch {rows[0]['prefetch']} per worker, "
        f"N {rows[0]['messages']}, from the first handler start to the last handler end "
        "in any worker. Messages per second, median (min-max):",
        "",
    ]
    out += _table(
        ["workers", "msg/s", "second worker later by (s)"],
        [
            [
                str(r["workers"]),
                f"{_rate(r['msgs_per_s'])} ({_rate(r['min'])}-{_rate(r['max'])})",
                f"{r['skew_s']:.2f}" if r["workers"] > 1 else "-",
            ]
            for r in rows
        ],
    )
    if 1 in by and 2 in by:
        ratio = by[2]["msgs_per_s"] / by[1]["msgs_per_s"]
        out += ["", f"Ratio `--workers 2` / one worker: **{ratio:.2f}x**."]
    return out


def plot(doc: dict[str, Any], stem: Path) -> list[Path]:
    """One PNG per workload: messages per second against prefetch (log-log), a line per
    library with its min-max as error bars; the ideal (sleep10ms) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[dict[str, Any]] = doc["throughput"]
    written = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        fig, ax = plt.subplots(figsize=(8, 5))
        for lib in doc["meta"]["libraries"]:
            mine = sorted(
                (r for r in rows if r["library"] == lib and r["workload"] == workload),
                key=lambda r: r["prefetch"],
            )
            if not mine:
                continue
            xs = [r["prefetch"] for r in mine]
            ys = [r["msgs_per_s"] for r in mine]
            err = [[y - r["min"] for y, r in zip(ys, mine, strict=True)]]
            err.append([r["max"] - y for y, r in zip(ys, mine, strict=True)])
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                marker="o",
                capsize=3,
                label=lib,
                linewidth=2.5 if lib in OURS else 1.2,
                linestyle=":" if lib == CEILING else "-",
            )
        prefetches = sorted({r["prefetch"] for r in rows if r["workload"] == workload})
        if workload == "sleep10ms":
            ax.plot(
                prefetches,
                [p / SLEEP for p in prefetches],
                linestyle="--",
                color="grey",
                label="ideal (prefetch / 10 ms)",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(prefetches, [str(p) for p in prefetches])
        ax.set_xlabel("prefetch")
        ax.set_ylabel("messages per second (median, min-max)")
        ax.set_title(f"Consume throughput, workload {workload} ({doc['meta']['date']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{workload}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
