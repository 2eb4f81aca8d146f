"""Compare round-trip benchmark runs (``python -m bench --only 3``) of two versions.

    .venv/bin/python -m bench.compare --label before A.json B.json --label after C.json D.json

Each run is judged against the floors measured in that same run (the
machine is shared and noisy): STATE and PLUG against the Trio eventfd
ping-pong, GET_CONFIG against the Trio and the blocking-Python socket
echoes. Prints one Markdown table per placement, one row per run and the
median of each label's runs; with exactly two labels, then the change from
the first to the second (of the medians: p50 in µs, and the ratios to the
floors). UNPLUG appears when every run measured it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REQUESTS = ("STATE", "PLUG (no prealloc)", "UNPLUG (unpopulated block)", "GET_CONFIG")
EVENTFD_FLOOR = "eventfd ping-pong, Trio echo (1 task)"
SOCKET_FLOORS = ("socket echo, Trio", "socket echo, Python (blocking)")
PLACEMENTS = ("same CPU", "different CPUs", "unpinned")


def row(summary: dict) -> dict[str, float]:
    p50 = {name: cell["p50_us"] for name, cell in summary.items()}
    out = {f"{r} p50 µs": p50[r] for r in REQUESTS if r in p50}
    out["STATE / eventfd"] = p50["STATE"] / p50[EVENTFD_FLOOR]
    out["PLUG / eventfd"] = p50["PLUG (no prealloc)"] / p50[EVENTFD_FLOOR]
    if REQUESTS[2] in p50:
        out["UNPLUG / eventfd"] = p50[REQUESTS[2]] / p50[EVENTFD_FLOOR]
    out["GET_CONFIG / Trio echo"] = p50["GET_CONFIG"] / p50[SOCKET_FLOORS[0]]
    out["GET_CONFIG / Python echo"] = p50["GET_CONFIG"] / p50[SOCKET_FLOORS[1]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", nargs="+", action="append", required=True, metavar=("LABEL", "JSON"),
                    help="a label and the latest.json files of its runs")
    args = ap.parse_args(argv)
    runs = [(group[0], Path(p)) for group in args.label for p in group[1:]]
    for placement in PLACEMENTS:
        rows = []
        for label, path in runs:
            data = json.loads(path.read_text())
            meta = data["meta"]
            summary = data["benchmarks"]["roundtrip"]["summary"][placement]
            rows.append((f"{label} ({meta['date']}, git {meta['host'].get('git')})", label, row(summary)))
        columns = [c for c in rows[0][2] if all(c in values for _, _, values in rows)]
        print(f"\n### {placement}\n")
        print("| run | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for name, _, values in rows:
            print(f"| {name} | " + " | ".join(_fmt(c, values[c]) for c in columns) + " |")
        medians = {}
        for label in dict.fromkeys(label for _, label, _ in rows):
            mine = [values for _, lab, values in rows if lab == label]
            med = medians[label] = {c: statistics.median(v[c] for v in mine) for c in columns}
            print(f"| **{label}: median of {len(mine)}** | " + " | ".join(_fmt(c, med[c]) for c in columns) + " |")
        if len(medians) == 2:
            (first, a), (second, b) = medians.items()
            print(f"| **{second} vs {first}** | " + " | ".join(f"{(b[c] / a[c] - 1) * 100:+.1f} %"
                                                            for c in columns) + " |")
    return 0


def _fmt(column: str, value: float) -> str:
    return f"{value:.1f}" if "µs" in column else f"{value:.2f}x"


if __name__ == "__main__":
    raise SystemExit(main())
