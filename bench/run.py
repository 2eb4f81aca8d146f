"""The one command: run every benchmark, write the report.

    .venv/bin/python -m bench            full run (~4 min; up to 16 GiB is populated and freed)
    .venv/bin/python -m bench --quick    smoke run (< 60 s, 1 GiB at most)
    options: --out DIR (default bench/results), --only 1,2,3 (benchmark numbers; 4 and 6 come with 3)

Exit status: 0 when every benchmark ran (targets are reported, never
asserted), 1 when a benchmark crashed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from . import report, suites
from .common import Helper, daemon_command, host_meta, serve_args, uptime_line

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few iterations (< 60 s)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="directory for latest.md/.json/.png")
    ap.add_argument("--only", default="1,2,3,5,6,7", help="comma-separated benchmark numbers (default: all)")
    args = ap.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if "4" in only:  # GET_CONFIG is measured in the round-trip session
        only.add("3")
    if not only <= {"1", "2", "3", "4", "5", "6", "7"}:
        ap.error(f"--only takes benchmark numbers 1-7, got {args.only!r}")
    os.makedirs(args.out, exist_ok=True)

    started = time.monotonic()
    meta = {"quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([".venv/bin/python -m bench"] + [shlex.quote(a) for a in (argv or sys.argv[1:])]),
            "host": host_meta(), "uptime_before": uptime_line(),
            "daemon": " ".join([*daemon_command(), "serve", *serve_args("DIR")])}
    helper = Helper()
    run = suites.Run(quick=args.quick, helper=helper)
    benchmarks: dict = {}
    errors: dict[str, str] = {}
    samples = None

    def step(name: str, number: str, fn):
        if number not in only:
            return None
        t0 = time.monotonic()
        print(f"[bench] {number}. {name} ...", file=sys.stderr, flush=True)
        try:
            benchmarks[name] = fn()
        except Exception:
            errors[name] = traceback.format_exc()
            print(f"[bench] {name} CRASHED:\n{errors[name]}", file=sys.stderr, flush=True)
            return None
        print(f"[bench] {name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        return benchmarks[name]

    try:
        step("unplug", "1", lambda: suites.unplug_throughput(run))
        step("prealloc", "2", lambda: suites.prealloc_plug(run))
        rt = step("roundtrip", "3", lambda: suites.roundtrips(run))
        if rt:
            samples = rt.pop("samples_ns")
            rt["cdf_us_quantiles"] = {k: report.cdf_points(v) for k, v in samples.items()}
        step("scale", "5", lambda: suites.scale(run))
        step("footprint", "6", lambda: suites.footprint(run, rt))
        step("e2e", "7", lambda: suites.e2e(run))
    finally:
        helper.close()

    meta["uptime_after"] = uptime_line()
    meta["duration_s"] = time.monotonic() - started
    result = {"meta": meta, "targets": run.targets, "notes": run.notes, "errors": errors,
              "benchmarks": benchmarks}
    result["plots"] = report.plots(result, samples, args.out)
    md = report.markdown(result)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    missed = [t for t in run.targets if not t["met"]]
    print(f"[bench] wrote {args.out}/latest.md and latest.json in {meta['duration_s']:.0f} s; "
          f"targets met {len(run.targets) - len(missed)}/{len(run.targets)}"
          + (f"; CRASHED: {', '.join(errors)}" if errors else ""), file=sys.stderr)
    for t in missed:
        print(f"[bench]   missed: {t['bench']}: {t['what']} = {t['value']:.2f}{t['unit']} (target {t['target']})",
              file=sys.stderr)
    return 1 if errors else 0
