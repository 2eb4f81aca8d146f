"""Soak: many resize cycles and reconnects; the daemon's memory and fds must not grow."""

from __future__ import annotations

import os

import trio

from vmemdev.testing.frontend import Frontend
from vmemdev.testing.lab import Lab

MiB = 1 << 20
CYCLES = 500
RECONNECTS = 200


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_resize_cycles_do_not_grow_the_daemon():
    with Lab(guest_touches=False) as lab:
        pid = lab.process.pid
        samples = []
        for cycle in range(CYCLES):
            lab.resize("128M")
            lab.resize(0)
            if cycle in (CYCLES // 5, CYCLES - 1):
                samples.append((rss_kib(pid), fd_count(pid)))
        (rss_early, fds_early), (rss_late, fds_late) = samples
        assert fds_late == fds_early, samples
        assert rss_late - rss_early < 4 * 1024, f"RSS grew from {rss_early} to {rss_late} KiB"
        stats = lab.ctl.execute("query-stats")
        assert stats["requests"]["PLUG"]["ACK"] == CYCLES
        assert stats["requests"]["UNPLUG"]["ACK"] == CYCLES
        assert lab.allocated() == 0


def test_reconnects_do_not_leak():
    with Lab(guest_touches=False) as lab:
        pid = lab.process.pid
        lab.close_guest()  # a second front-end would wait while the lab's is attached
        samples = []

        async def reconnect_many():
            for i in range(RECONNECTS):
                fe = Frontend(lab.socket_path)
                with trio.fail_after(10):
                    await fe.realize()
                    await fe.start()
                    await fe.get_config()
                await fe.close()
                fe.release()
                with trio.fail_after(10):
                    while lab.status()["frontend"] != "waiting":
                        await trio.sleep(0.01)
                if i in (RECONNECTS // 5, RECONNECTS - 1):
                    samples.append((rss_kib(pid), fd_count(pid)))

        trio.run(reconnect_many)
        (rss_early, fds_early), (rss_late, fds_late) = samples
        assert fds_late == fds_early, samples
        assert rss_late - rss_early < 4 * 1024, samples
