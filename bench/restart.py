"""Kill-to-service time: how long a front-end waits when `vmemdev serve` dies.

    .venv/bin/python -m bench.restart [--runs 10] [--out bench/results/restart.txt]

`vmemdev hold -- vmemdev serve --state-file ...` with a front-end attached
(in this process, as QEMU would be); each run plugs a block, kills the
serving process with SIGKILL and times from the kill to the answer of the
next request (a STATE), which the restarted process serves on the same
connection. The holder's restart delay (0.1 s, doubling while the worker
dies young) is part of the figure; the runs are spaced so that it resets.

Then the same for upgrades in place: while the front-end sends STATE
requests back to back, `vmemdev ctl upgrade` runs (as an operator types
it); the figure is the longest wait for an answer during the upgrade.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from vmemdev.protocol.virtio_mem import ResponseType
from vmemdev.testing.frontend import Frontend
from vmemdev.testing.processes import only_child

A = 1 << 32
VMEMDEV = [sys.executable, "-m", "vmemdev"]


async def _wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError
        await trio.sleep(0.01)
    return value


async def measure(runs: int, spacing: float, upgrades: int) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory(prefix="vmemdev-restart-") as tmp:
        sock = os.path.join(tmp, "vm0.sock")
        holder = subprocess.Popen(VMEMDEV + ["hold", "--", *VMEMDEV, "serve", "--socket-path", sock,
                                             "--state-file", os.path.join(tmp, "vm0.state"),
                                             "--requested-size", "1G", "--log-level", "warning"],
                                  stderr=subprocess.DEVNULL)
        try:
            await _wait_for(lambda: os.path.exists(os.path.join(tmp, "vm0.ctl")))
            fe = Frontend(sock)
            await fe.realize()
            await fe.start()
            times = []
            for i in range(runs):
                assert await fe.plug(A + i * (2 << 20), 1) == ResponseType.ACK
                worker = await _wait_for(lambda: only_child(holder.pid))
                t0 = time.perf_counter()
                os.kill(worker, signal.SIGKILL)
                with trio.fail_after(30):
                    assert (await fe.state(A, 1))[0] == ResponseType.ACK
                times.append(time.perf_counter() - t0)
                await trio.sleep(spacing)
            pauses = []
            ctl = VMEMDEV + ["ctl", "--control-socket", os.path.join(tmp, "vm0.ctl"), "upgrade"]
            for _ in range(upgrades):
                answered = [time.perf_counter()]
                done = trio.Event()

                async def keep_asking(answered=answered, done=done):  # never cancelled mid-request
                    while not done.is_set():
                        assert (await fe.state(A, 1))[0] == ResponseType.ACK
                        answered.append(time.perf_counter())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_asking)
                    await trio.sleep(0.2)
                    start = len(answered)
                    with trio.fail_after(60):
                        await trio.run_process(ctl, capture_stdout=True)
                    await trio.sleep(0.5)
                    done.set()
                gaps = [b - a for a, b in zip(answered[start - 1:], answered[start:])]
                pauses.append(max(gaps))
            await fe.close()
            fe.release()
            return times, pauses
        finally:
            holder.send_signal(signal.SIGTERM)
            holder.wait(timeout=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--spacing", type=float, default=11.0, help="seconds between kills (> 10: delay resets)")
    ap.add_argument("--upgrades", type=int, default=5)
    ap.add_argument("--out", default="bench/results/restart.txt")
    args = ap.parse_args()
    times, pauses = trio.run(measure, args.runs, args.spacing, args.upgrades)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    ms = sorted(t * 1000 for t in times)
    up = sorted(t * 1000 for t in pauses)
    text = (f"command: .venv/bin/python -m bench.restart --runs {args.runs} --spacing {args.spacing} "
            f"--upgrades {args.upgrades}\n"
            f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, git {git}, "
            f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load {os.getloadavg()[0]:.2f}\n\n"
            f"kill -9 of the serving process -> next request answered on the same connection, ms:\n"
            f"  min {ms[0]:.0f}, median {statistics.median(ms):.0f}, max {ms[-1]:.0f}  (n = {len(ms)})\n"
            f"  runs: {', '.join(f'{t:.0f}' for t in ms)}\n\n"
            f"`vmemdev ctl upgrade` -> longest wait for an answer (STATE requests back to back), ms:\n"
            f"  min {up[0]:.0f}, median {statistics.median(up):.0f}, max {up[-1]:.0f}  (n = {len(up)})\n"
            f"  runs: {', '.join(f'{t:.0f}' for t in up)}\n")
    print(text, end="")
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
