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
  auto-movable  512M boot RAM, memhp_default_state=online
            memory_hotplug.online_policy=auto-movable, 32G region, resize 32G
            (forced, so that what is recorded is the guest's, whatever the
            daemon's policy): it plugs all of it, the memmap of most blocks in
            the region (the ``allocated`` of each line shows where)
  tmpfs     512M boot RAM filled by a tmpfs until ~25 MiB of kernel memory are
            free (m4 of test_memmap_guest.py), 8G region, resize 8G with the
            daemon's defaults (rescue on); watched for 70 s
  tmpfs-norescue  the same with `--memmap-rescue off` (the control: what the
            rescue spares the guest); watched for 130 s, then m4's workloads
            (forks, 8 MiB written, 12 MiB of kernel memory) and its OOM/panic lines
  limit-movable, limit-memmap-on-memory, limit-kernel, limit-small-movable
            the guest's own limit per onlining (README, "The memmap limit"):
            512M boot, 32G region (256M and 16G for small-movable), the whole
            region asked with --force and the rescue off; the LIMIT lines of
            the notes are the table's

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
from tests.e2e.test_memmap_guest import (  # noqa: E402
    AUTO_MOVABLE,
    fill_kernel_memory,
    guest_alive_and_clean,
    kernel_free,
)

MiB = harness.MiB
DEFAULT_OUT = HERE.parents[1] / "data" / "memmap"
STARTED: list[harness.Lab] = []


def start(name: str, out: Path, **kw) -> harness.Lab:
    path = out / f"{name}.jsonl"
    path.unlink(missing_ok=True)
    os.environ["VMEMDEV_RECORD_REQUESTS"] = str(path)
    wrapper = out / ".recording-vmemdev.sh"  # this interpreter (the venv's), then the recorder
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "recording_vmemdev.py"} "$@"\n')
    wrapper.chmod(0o755)
    os.environ["VMEMDEV_E2E_BIN"] = str(wrapper)
    lab = harness.Lab(harness.guestlab_info(), f"record-{name}")
    STARTED.append(lab)  # closed by main() even when the scenario fails half-way
    lab.start("vmemdev", **kw)
    return lab


def guest_lines(lab: harness.Lab) -> str:
    if lab.guest is None:
        return "(no guest)"
    if not lab.guest.alive():
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


def auto_movable(out: Path, notes: list[str]) -> harness.Lab:
    lab = start("auto-movable", out, ram="512M", region="32G", kernel_args=AUTO_MOVABLE)
    notes.append(f"guest onlining: {lab.online_settings()}; kernel free {kernel_free(lab) / MiB:.1f} MiB")
    lab.device.daemon.execute("resize", size=32 << 30, force=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        plugged, requested = lab.device.sizes()
        if plugged == requested:
            break
        time.sleep(0.5)
    notes.append(f"after {time.monotonic() - t0:.1f} s: plugged {harness.mib(plugged)} of requested "
                 f"{harness.mib(requested)}; region allocated {harness.mib(harness.allocated(lab.device.mem_path))}")
    return lab


def tmpfs(out: Path, notes: list[str], name: str = "tmpfs", watch: float = 70,
          daemon_args: tuple[str, ...] = ()) -> harness.Lab:
    lab = start(name, out, ram="512M", region="8G", daemon_args=daemon_args)
    free = fill_kernel_memory(lab, 25 * MiB)
    notes.append(f"guest onlining: {lab.online_settings()}; tmpfs filled: kernel free {free / MiB:.1f} MiB, "
                 f"64 x F = {harness.mib(64 * free)}")
    lab.device.resize(8 << 30)
    t0 = time.monotonic()
    while time.monotonic() - t0 < watch:
        time.sleep(1)
    plugged, requested = lab.device.sizes()
    notes.append(f"after {watch:.0f} s: plugged {harness.mib(plugged)} of requested {harness.mib(requested)}, "
                 f"hot-add failures {lab.device.daemon.status()['hot_add_failures']['total']}")
    return lab


def tmpfs_norescue(out: Path, notes: list[str]) -> harness.Lab:
    lab = tmpfs(out, notes, "tmpfs-norescue", 130, ("--memmap-rescue", "off"))
    try:
        notes.append(f"kernel free then {kernel_free(lab) / MiB:.1f} MiB")
    except AssertionError as exc:  # the agent's shell could not even fork: what was seen in the guest
        notes.append(f"the guest did not answer: {exc}")
        return lab
    alive, evidence = guest_alive_and_clean(lab, "130 s after the resize, rescue off", alloc_mib=8,
                                            kmem_mib=12)
    notes.append(f"m4's workloads then (8 MiB dd, 12 MiB of kernel memory): "
                 f"{'alive and usable' if alive else 'NOT usable'}: {evidence[:3000]}")
    return lab


def limit(name: str, ram: str, region: str, kernel_args: tuple[str, ...]):
    """The guest's own limit, unprotected: the whole region asked with --force and
    the rescue off; watched until plugged stops moving for 20 s (the driver's
    retry comes 50 s after a failure), then 30 s more for the guest's fate."""
    def run(out: Path, notes: list[str]) -> harness.Lab:
        lab = start(name, out, ram=ram, region=region, kernel_args=kernel_args,
                    daemon_args=("--memmap-rescue", "off"))
        notes.append(f"{ram} boot, {region} region, kernel args {' '.join(kernel_args) or '(lab default)'}; "
                     f"guest onlining: {lab.online_settings()}; kernel free {kernel_free(lab) / MiB:.1f} MiB")
        size = harness.parse_size(region)
        lab.device.daemon.execute("resize", size=size, force=True)
        t0 = last_change = time.monotonic()
        last = -1
        while time.monotonic() - last_change < 20 and time.monotonic() - t0 < 900:
            plugged, _ = lab.device.sizes()
            if plugged != last:
                last, last_change = plugged, time.monotonic()
            if plugged == size:
                break
            time.sleep(0.5)
        status = lab.device.daemon.status()
        notes.append(f"LIMIT plugged reached {harness.mib(last)} of {region} "
                     f"({time.monotonic() - t0:.0f} s after the resize); onlining seen {status['memmap']['onlining']}; "
                     f"memmap held in the region {harness.mib(status['memmap']['held_in_region'])}; "
                     f"hot-add failures {status['hot_add_failures']['total']}")
        time.sleep(30)
        try:
            failed = lab.guest.run("dmesg | grep -c 'adding memory failed' ; true", timeout=20)[1].strip()
            notes.append(f"LIMIT 30 s later: the guest answers; 'adding memory failed' logged {failed} time(s)")
        except Exception as exc:  # dying of what this measures
            notes.append(f"LIMIT 30 s later: the guest does not answer ({str(exc).splitlines()[0]})")
        return lab
    run.__doc__ = limit.__doc__
    return run


SCENARIOS = {"rollback": rollback, "ordinary": ordinary, "bbm": bbm, "auto-movable": auto_movable,
             "tmpfs": tmpfs, "tmpfs-norescue": tmpfs_norescue,
             "limit-movable": limit("limit-movable", "512M", "32G", ()),
             "limit-memmap-on-memory": limit("limit-memmap-on-memory", "512M", "32G",
                                             ("memory_hotplug.memmap_on_memory=1",)),
             "limit-kernel": limit("limit-kernel", "512M", "32G", ("memhp_default_state=online_kernel",)),
             "limit-small-movable": limit("limit-small-movable", "256M", "16G", ())}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in args.scenarios:
        notes = [f"scenario {name}: {SCENARIOS[name].__doc__ or ''}".strip()]
        try:
            SCENARIOS[name](args.out, notes)
        except Exception as exc:
            notes.append(f"FAILED: {exc}")
            status = 1
        finally:
            while STARTED:
                lab = STARTED.pop()
                notes.append("--- guest dmesg (virtio_mem, memory, oom) ---\n" + guest_lines(lab))
                lab.close(keep=True)
                notes.append(f"work directory: {lab.workdir}")
            (args.out / f"{name}.notes.txt").write_text("\n".join(notes) + "\n")
            print("\n".join(notes), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
