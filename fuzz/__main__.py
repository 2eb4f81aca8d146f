"""Run one fuzz target under atheris (libFuzzer):

    python -m fuzz TARGET [--runs N] [--max-len N]     # TARGET from fuzz/targets.py, or "all"

atheris is the `fuzz` extra: pip install -e '.[fuzz]'.
The corpus grows in fuzz/corpus/TARGET (kept in git: tests replay it);
a crash is written to fuzz/crashes/TARGET/ and fails the run. Prints the
number of inputs executed per target.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(target: str, runs: int, max_len: int) -> int:
    try:
        import atheris
    except ImportError:
        print("python -m fuzz needs atheris: pip install -e '.[fuzz]'", file=sys.stderr)
        return 2

    with atheris.instrument_imports():
        from fuzz import targets  # noqa: F401
    from fuzz.targets import TARGETS

    logging.disable(logging.CRITICAL)  # the daemon logs every bad input; too slow here
    corpus = HERE / "corpus" / target
    crashes = HERE / "crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], str(corpus), f"-runs={runs}", f"-max_len={max_len}",
            f"-artifact_prefix={crashes}/", "-print_final_stats=1"]
    atheris.Setup(args, TARGETS[target])
    atheris.Fuzz()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz")
    parser.add_argument("target")
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--max-len", type=int, default=4096)
    args = parser.parse_args()
    if args.target != "all":  # import nothing of vmemdev before atheris instruments it
        return run_one(args.target, args.runs, args.max_len)
    from fuzz.targets import TARGETS

    failed = []
    for name in TARGETS:  # one process each: libFuzzer exits when done
        print(f"== {name}: {args.runs} runs", flush=True)
        code = subprocess.call([sys.executable, "-m", "fuzz", name, "--runs", str(args.runs),
                                "--max-len", str(args.max_len)], cwd=HERE.parent)
        if code:
            failed.append(name)
    print("failed: " + (", ".join(failed) or "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
