#!/usr/bin/env python3
"""Record the virtio_mem driver's request sequences from the real guest lab.

    .venv/bin/python tests/e2e/memmap/record_sequences.py SCENARIO... [--out DIR]

Scenarios (each boots its own guest, QEMU 11.1 TCG + Linux 7.2, onlining
movable as the lab's init sets it, against `vmemdev serve` run through
recording_vmemdev.py):

  rollback  256M boot RAM filled by a tmpfs until ~8 MiB are free, resize to
            1G: the driver plugs until its kernel memory for the memmap runs
            out, then rolls the failed block back; watched for 70 s so that
            the retry (50 s later) is in the recording too
  ordinary  512M boot RAM, with reboot: 0 -> 512M -> 128M -> 384M, then
            `reboot -f` with 384M plugged (UNPLUG_ALL at probe, plugs again)
  bbm       --block-size 256M (the driver's big-block mode): 0 -> 768M -> 256M -> 0

Writes DIR/SCENARIO.jsonl (one answered request per line, see
recording_vmemdev.py) and DIR/SCENARIO.notes.txt (what was done, the guest's
virtio_mem and memory lines of dmesg). Needs root and scripts/guestlab provision.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from tests.e2e import harness  # noqa: E402

MiB = harness.MiB
DEFAULT_OUT = HERE.parents[1] / "data" / "memmap"


def start(name: str, out: Path, **kw) -> harness.Lab:
    path = out / f"{name}.jsonl"
    path.unlink(missing_ok=True)
    os.environ["VMEMDEV_RECORD_REQUESTS"] = str(path)
    wrapper = out / ".recording-vmemdev.sh"  # this interpreter (the venv's), then the recorder
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "recording_vmemdev.py"} "$@"\n')
    wrapper.chmod(0o755)
    os.environ["VMEMDEV_E2E_BIN"] = str(wrapper)
    lab = harness.Lab(harness.guestlab_info(), f"record-{name}")
    lab.start("vmemdev", **kw)
    return lab


def guest_lines(lab: harness.Lab) -> str:
    if lab.guest is None or not lab.guest.alive():
        return "(guest not running)\n" + harness.console_tail(lab.guest.console_log, 40)
    try:
        st, out = lab.guest.run("dmesg | grep -iE 'virtio_mem|memory|oom|vmemmap|add_pages' | tail -n 60",
                                timeout=20)
        return out
    except Exception as exc:  # the guest may be dying of exactly what we recorded
        return f"(dmesg not available: {exc})\n" + harness.console_tail(lab.guest.console_log, 40)


def rollback(out: Path, notes: list[str]) -> harness.Lab:
    lab = start("rollback", out, ram="256M")
    mi = lab.meminfo()
    fill = mi["MemFree"] // 1024 - 8
    lab.check(f"mkdir -p /fill && mount -t tmpfs -o size=1G tmpfs /fill && "
              f"dd if=/dev/zero of=/fill/ballast bs=1M count={fill} 2>&1 | tail -1", timeout=300)
    free = lab.meminfo()["MemFree"]
    notes.append(f"filled {fill} MiB of tmpfs; MemFree {free / 1024:.1f} MiB before the resize")
    lab.device.resize(1 << 30)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 70:
        time.sleep(1)
    plugged, requested = lab.device.sizes()
    notes.append(f"after 70 s: plugged {harness.mib(plugged)} of requested {harness.mib(requested)}")
    return lab


def ordinary(out: Path, notes: list[str]) -> harness.Lab:
    lab = start("ordinary", out, ram="512M", reboot=True)
    for target in (512 * MiB, 128 * MiB, 384 * MiB):
        lab.resize_and_wait(target, scenario="record", label=f"to {harness.mib(target)}")
        notes.append(f"reached {harness.mib(target)}")
    lab.guest.serial.send("RUN reboot0 reboot -f")
    lab.guest.wait_ready(120)
    lab.wait_probe()
    lab.wait_target(384 * MiB, t0=time.monotonic(), where="after reboot -f")
    notes.append("reboot -f with 384M plugged; plugged 384M again after the probe")
    return lab


def bbm(out: Path, notes: list[str]) -> harness.Lab:
    lab = start("bbm", out, ram="512M", daemon_args=("--block-size", "256M"))
    for target in (768 * MiB, 256 * MiB, 0):
        lab.resize_and_wait(target, scenario="record", label=f"to {harness.mib(target)}")
        notes.append(f"reached {harness.mib(target)}")
    return lab


SCENARIOS = {"rollback": rollback, "ordinary": ordinary, "bbm": bbm}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in args.scenarios:
        notes = [f"scenario {name}: {SCENARIOS[name].__doc__ or ''}".strip()]
        lab = None
        try:
            lab = SCENARIOS[name](args.out, notes)
        except Exception as exc:
            notes.append(f"FAILED: {exc}")
            status = 1
        finally:
            if lab is not None:
                notes.append("--- guest dmesg (virtio_mem, memory, oom) ---\n" + guest_lines(lab))
                lab.close(keep=True)
                notes.append(f"work directory: {lab.workdir}")
            (args.out / f"{name}.notes.txt").write_text("\n".join(notes) + "\n")
            print("\n".join(notes), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
