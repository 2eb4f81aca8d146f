"""What the cgroup headroom rule must reserve, measured in real cgroup v1 children.

    .venv/bin/python -m bench.cgroup_band [--out bench/results/cgroup-band.txt]

1. The kernel's overhead per byte of guest memory, charged to the same
   cgroup: a member process fallocate()s a memfd (what `--prealloc` does), or
   touches it through a shared mapping (what a guest's page faults do to
   QEMU). Overhead = usage_in_bytes growth minus the bytes.
2. The daemon's own growth while it serves: `vmemdev serve --prealloc` in a
   cgroup, a front-end (this process, outside it) plugging 1 GiB in 2 MiB
   blocks and unplugging it, three times. Growth = usage − what the region
   holds − the overhead of 1, against the usage right after attaching.
3. Charge batching: how far usage_in_bytes runs ahead of the pages and
   kernel memory the cgroup's statistics count (the per-CPU charge stock),
   sampled during 2.

Needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from vmemdev.protocol.virtio_mem import ResponseType
from vmemdev.testing.cgroup import ChildMemoryCgroup
from vmemdev.testing.frontend import Frontend

MiB = 1 << 20
ADDR = 1 << 32


def counted(cg: ChildMemoryCgroup) -> int:
    """What the cgroup's statistics count: pages (rss + cache) and kernel memory."""
    stat = {k: int(v) for k, v in (line.split() for line in cg.read("memory.stat").splitlines())}
    return stat["total_rss"] + stat["total_cache"] + int(cg.read("memory.kmem.usage_in_bytes"))


def overhead(size: int, how: str) -> int:
    """Bytes charged beyond ``size`` when a member process allocates a memfd's pages."""
    cg = ChildMemoryCgroup("vmemdev-band")
    fd = os.memfd_create("band")
    os.ftruncate(fd, size)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the member: enter, wait, allocate, report, hold
        cg.enter()
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        if how == "fallocate":
            os.posix_fallocate(fd, 0, size)
        else:
            mm = mmap.mmap(fd, size)
            ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(mm)), 0x5A, size)
        os.write(ready_w, b"d")
        time.sleep(60)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        time.sleep(0.2)
        before = cg.usage()
        os.write(go_w, b"g")
        os.read(ready_r, 1)
        return cg.usage() - before - size
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        for f in (fd, ready_r, ready_w, go_r, go_w):
            os.close(f)
        cg.remove()


async def daemon_growth(region: int, cycles: int) -> dict[str, int]:
    cg = ChildMemoryCgroup("vmemdev-band")
    tmp = tempfile.TemporaryDirectory(prefix="vmemdev-band-")
    sock = os.path.join(tmp.name, "vm0.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vmemdev", "serve", "--socket-path", sock,
                             "--region-addr", hex(ADDR), "--region-size", str(region),
                             "--requested-size", str(region), "--prealloc", "--log-level", "warning"],
                            preexec_fn=cg.enter)
    try:
        while not os.path.exists(os.path.join(tmp.name, "vm0.ctl")):
            await trio.sleep(0.02)
        fe = Frontend(sock, ram_size=64 * MiB, device_addr=ADDR, device_size=region)
        await fe.realize()
        await fe.start()
        await trio.sleep(0.5)
        base = cg.usage()
        growth = batch = 0
        for _ in range(cycles):
            for i in range(region // (2 * MiB)):
                assert await fe.plug(ADDR + i * 2 * MiB, 1) == ResponseType.ACK
                if i % 16 == 0:
                    usage, held = cg.usage(), fe.dimm_allocated()
                    growth = max(growth, usage - base - held - held // 431)
                    batch = max(batch, usage - counted(cg))
            assert await fe.unplug_all() == ResponseType.ACK
        await trio.sleep(0.5)
        end = cg.usage() - base
        await fe.close()
        fe.release()
        return {"max_growth": growth, "after_cycles": end, "max_batch": batch}
    finally:
        proc.terminate()
        proc.wait()
        tmp.cleanup()
        cg.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/cgroup-band.txt")
    args = parser.parse_args()
    lines = [f"command: .venv/bin/python -m bench.cgroup_band --out {args.out}",
             f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
             f"git {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}",
             f"host: Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}", ""]
    lines.append("1. kernel overhead per byte, charged to the member's cgroup")
    for how in ("fallocate", "touch"):
        for size in (512 * MiB, 2048 * MiB):
            extra = overhead(size, how)
            lines.append(f"   {how:9s} {size // MiB:5d} MiB: +{extra / 1024:7.0f} KiB = 1/{size / max(extra, 1):.0f} of the size")
    result = trio.run(daemon_growth, 1 << 30, 3)
    lines += ["", "2. the daemon's own charge while it serves (--prealloc, 3 cycles of 1 GiB in 2 MiB plugs)",
              f"   max growth beyond the region's pages and their overhead: {result['max_growth'] / MiB:.2f} MiB",
              f"   after the cycles, all unplugged: {result['after_cycles'] / MiB:+.2f} MiB",
              "", "3. charge batching (usage_in_bytes minus rss + cache + kmem, sampled in 2)",
              f"   max: {result['max_batch'] / MiB:.2f} MiB"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
