"""`vmemdev ctl` against a real `vmemdev serve` process, and limits in a real cgroup."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import trio

from vmemdev.host.cgroup import Cgroup
from vmemdev.host.interface import CgroupReading
from vmemdev.protocol.virtio_mem import ResponseType
from vmemdev.testing.frontend import Frontend
from vmemdev.testing.guest import SimulatedLinuxGuest

MiB = 1 << 20
A = 1 << 32
VMEMDEV = [sys.executable, "-m", "vmemdev"]


class Daemon:
    """`vmemdev serve` as a separate process, as an operator runs it."""

    def __init__(self, tmp_path, *args, cgroup_procs: str | None = None):
        self.sock = str(tmp_path / "vm0.sock")
        self.ctl = str(tmp_path / "vm0.ctl")  # the documented default next to the socket
        self.log = open(tmp_path / "daemon.log", "w+")

        def enter_cgroup():
            if cgroup_procs:
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))

        self.proc = subprocess.Popen(VMEMDEV + ["serve", "--socket-path", self.sock, *args],
                                     stderr=self.log, preexec_fn=enter_cgroup)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.ctl):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("daemon did not start: " + self.logs())
            time.sleep(0.02)

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=10)


async def ctl(daemon: Daemon, *args) -> tuple[int, str, str]:
    result = await trio.run_process(VMEMDEV + ["ctl", "--control-socket", daemon.ctl, *args],
                                    capture_stdout=True, capture_stderr=True, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def attach_guest(nursery, daemon: Daemon, run_guest: bool = True):
    fe = Frontend(daemon.sock)
    await fe.realize()
    nursery.start_soon(fe.watch_backend_channel)
    await fe.start()
    guest = SimulatedLinuxGuest(fe)
    if run_guest:
        await nursery.start(guest.run)
    return fe, guest


async def test_ctl_commands_drive_a_real_daemon(nursery, tmp_path):
    daemon = Daemon(tmp_path)
    try:
        fe, guest = await attach_guest(nursery, daemon)
        rc, out, err = await ctl(daemon, "resize", "256M", "--wait", "--timeout", "60")
        assert rc == 0 and "reached 256M" in out, out + err
        rc, out, _ = await ctl(daemon, "status")
        assert rc == 0 and "plugged     256M" in out and "front-end   attached" in out
        rc, out, _ = await ctl(daemon, "--json", "status")
        assert json.loads(out)["plugged_size"] == 256 * MiB
        for command in (["status"], ["limits"], ["stats"], ["accounting"], ["get"], ["events"]):
            rc, out, err = await ctl(daemon, *command, "--json")  # after the command, as users type it
            assert rc == 0, (command, err)
            # events print one JSON document per line (JSON Lines); the rest print one document
            documents = [json.loads(line) for line in out.splitlines()] if command == ["events"] else [json.loads(out)]
            assert documents and all(isinstance(d, dict) for d in documents), (command, out)
        rc, out, err = await ctl(daemon, "resize", "3M")
        assert rc == 1 and "not a multiple of the block size" in err
        rc, out, err = await ctl(daemon, "resize", "4G")
        assert rc == 1 and "larger than the region" in err
        rc, out, _ = await ctl(daemon, "set", "memory.max", "128M")
        assert rc == 0 and "memory.max   128M" in out
        rc, out, err = await ctl(daemon, "resize", "256M")
        assert rc == 1 and "above memory.max" in err
        rc, out, _ = await ctl(daemon, "resize", "128M", "--wait", "--timeout", "60")
        assert rc == 0, out
        rc, out, _ = await ctl(daemon, "get", "memory.max")
        assert out.strip() == "memory.max 128M"
        rc, out, _ = await ctl(daemon, "accounting")
        assert "outside plugged       0 (must be 0)" in out and "host allocated        128M" in out
        rc, out, _ = await ctl(daemon, "stats")
        assert "PLUG" in out and "UNPLUG" in out and "discarded   128M" in out
        rc, out, _ = await ctl(daemon, "events")
        assert "CONFIG_CHANGE_SENT" in out and "LIMIT_CHANGED" in out and "FRONTEND_CONNECTED" in out
        rc, out, _ = await ctl(daemon, "set", "memory.max", "max")
        assert "memory.max   max" in out
        guest.check_contents()
        await fe.close()
        fe.release()
    finally:
        assert daemon.stop() == 0


async def test_resize_wait_reports_a_stalled_guest(nursery, tmp_path):
    daemon = Daemon(tmp_path)
    try:
        fe, guest = await attach_guest(nursery, daemon, run_guest=False)  # a driver that never plugs
        rc, out, _ = await ctl(daemon, "resize", "256M", "--wait", "--stall", "1", "--timeout", "30")
        assert rc == 1
        assert "stopped at plugged 0 of requested 256M" in out and "no progress for 1 s" in out
        assert "is the guest driver loaded" in out
        await fe.close()
        fe.release()
        with trio.fail_after(10):
            while True:
                rc, out, _ = await ctl(daemon, "resize", "128M", "--wait")
                if "no front-end is attached" in out:
                    break
        assert rc == 1
    finally:
        daemon.stop()


async def test_ctl_without_a_daemon_says_so(tmp_path):
    result = await trio.run_process(VMEMDEV + ["ctl", "--control-socket", str(tmp_path / "none.ctl"), "status"],
                                    capture_stderr=True, check=False)
    assert result.returncode == 1 and b"cannot connect to the control socket" in result.stderr


def test_cgroup_v2_files_are_read(tmp_path):
    """memory.current against the lower of memory.max and memory.high, at every
    level up to the root; the level with the least headroom binds."""
    vm = tmp_path / "machine" / "vm0"
    vm.mkdir(parents=True)
    for level, (high, max_, current) in {tmp_path / "machine": ("max", str(1 << 30), str(900 * MiB)),
                                         vm: ("max", "max", str(MiB))}.items():
        (level / "memory.high").write_text(high + "\n")
        (level / "memory.max").write_text(max_ + "\n")
        (level / "memory.current").write_text(current + "\n")
    cg = Cgroup(str(vm))
    assert cg.version == 2
    # The parent binds: 1G - 900M = 124M of headroom, vs. none set on vm0 itself.
    assert cg.read() == CgroupReading(1 << 30, 900 * MiB, str(tmp_path / "machine"))
    (vm / "memory.high").write_text(str(64 * MiB))  # crossing high throttles: it counts
    assert cg.read() == CgroupReading(64 * MiB, MiB, str(vm))
    (vm / "memory.high").write_text("max")
    (tmp_path / "machine" / "memory.max").write_text("max")
    assert cg.read().limit is None


def test_not_a_cgroup_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="is not a memory cgroup"):
        Cgroup(str(tmp_path))




def v1_usage(path: str) -> int:
    return Cgroup(path).usage()


async def test_prealloc_charges_a_real_cgroup_and_headroom_stops_plugs(nursery, tmp_path, memory_cgroup):
    child_cgroup = memory_cgroup.path
    limit = 384 * MiB
    with open(os.path.join(child_cgroup, "memory.limit_in_bytes"), "w") as f:
        f.write(str(limit))
    daemon = Daemon(tmp_path, "--cgroup", child_cgroup, "--prealloc",
                    cgroup_procs=os.path.join(child_cgroup, "cgroup.procs"))
    try:
        fe, _ = await attach_guest(nursery, daemon, run_guest=False)
        base = v1_usage(child_cgroup)
        rc, _, err = await ctl(daemon, "resize", "1G")
        assert rc == 0, err
        # Preallocation charges the daemon's cgroup: usage rises by what was plugged.
        assert await fe.plug(A, 64) == ResponseType.ACK
        after_plug = v1_usage(child_cgroup)
        assert 128 * MiB <= after_plug - base <= 128 * MiB + 8 * MiB
        assert fe.dimm_allocated() == 128 * MiB
        # Unplugging uncharges.
        assert await fe.unplug(A, 64) == ResponseType.ACK
        assert v1_usage(child_cgroup) - base < 8 * MiB
        assert fe.dimm_allocated() == 0
        # Plug until the cgroup has no headroom: BUSY with the reason, never an OOM kill
        # (not NACK: Linux re-sends a NACKed PLUG at once and would spin).
        answers = []
        for i in range(8):
            answers.append(await fe.plug(A + i * 64 * 2 * MiB, 64))
            if answers[-1] != ResponseType.ACK:
                break
        assert answers[-1] == ResponseType.BUSY and answers.count(ResponseType.ACK) == 2
        assert v1_usage(child_cgroup) <= limit
        assert daemon.proc.poll() is None  # alive
        rc, out, _ = await ctl(daemon, "--json", "stats")
        assert json.loads(out)["busy_by_reason"] == {"cgroup": 1}
        rc, out, _ = await ctl(daemon, "limits")
        assert child_cgroup in out and re.search(r"limit +384M", out) and re.search(r"band +32M", out)
        assert re.search(r"refused \(BUSY\): cgroup .*: limit 384M, usage .*, band 32M: room .*, 129M needed",
                         daemon.logs())
        await fe.close()
        fe.release()
    finally:
        assert daemon.stop() == 0


async def test_ctl_names_a_failed_hot_add_and_guards_the_memmap_ceiling(nursery, tmp_path):
    """A guest onlining movable with 8 MiB of kernel memory left (4 memory blocks'
    memmap), and 64 MiB of boot RAM: with the default reserve (192M) its ceiling is 0."""
    daemon = Daemon(tmp_path)
    try:
        fe, _ = await attach_guest(nursery, daemon, run_guest=False)
        guest = SimulatedLinuxGuest(fe, touch=False, kernel_memory=8 * MiB)
        guest_scope, guest_done = trio.CancelScope(), trio.Event()

        async def run_guest(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with guest_scope:
                    await guest.run(task_status=task_status)
            finally:
                guest_done.set()

        await nursery.start(run_guest)
        # Asked before its onlining is known: capped once it is seen onlining movable
        # (third block added), never below what it plugged.
        rc, out, err = await ctl(daemon, "resize", "1G", "--wait", "--stall", "60", "--timeout", "60")
        assert rc == 1, out + err
        assert "stopped at plugged 512M of requested 512M" in out and "above its memmap ceiling 0" in out, out
        assert "'vmemdev ctl resize 1G --force'" in out
        rc, out, _ = await ctl(daemon, "accounting")
        assert "held in the region  0 (measured)" in out and "charged to boot     8M (estimated)" in out, out
        rc, out, _ = await ctl(daemon, "status")
        assert "protection  rescue on (margin 32M), 1 cap(s), 0 rescue(s)" in out, out
        # Forced past it: the fifth block is rolled back, named at once, and the rescue asks the
        # guest to remove what it added (16 blocks' worth: all four) and stop retrying.
        # It fails on the rollback, named as such, not on the 60 s stall or timeout.
        rc, out, err = await ctl(daemon, "resize", "1G", "--force", "--wait", "--stall", "60", "--timeout", "60")
        assert rc == 1, out + err
        assert "rolled it back" in out and "0x120000000+128M" in out and "kernel memory" in out, out
        assert "requested lowered from 1G to 0, below plugged 512M" in out and "(1 time(s))" in out, out
        with trio.fail_after(10):
            while guest.plugged or guest.kernel_memory != 8 * MiB:
                await trio.sleep(0.05)
        rc, out, _ = await ctl(daemon, "stats")
        assert rc == 0 and int(out.split("hot-add")[1].split()[0]) == 1, out
        rc, out, _ = await ctl(daemon, "status")
        assert "onlining    movable" in out and "enforced: the guest onlines movable" in out, out
        assert "hot-add     1 failed" in out and "the guest could not add it" in out
        assert "1 cap(s), 1 rescue(s)" in out and "last rescue: " in out, out
        rc, out, _ = await ctl(daemon, "events")
        assert "HOT_ADD_FAILED" in out and "MEMMAP_RESCUE" in out and "MEMMAP_CEILING_APPLIED" in out
        rc, out, err = await ctl(daemon, "resize", "768M")
        assert rc == 1 and "above the memmap ceiling 0" in err and "resize 768M --force" in err, err
        rc, out, err = await ctl(daemon, "reserve", "32M")
        assert rc == 0 and "ceiling     2040M = 64 x (boot 65408K - reserve 32M)" in out, out + err
        rc, out, err = await ctl(daemon, "reserve", "lots")
        assert rc == 1 and "value" in err, err
        rc, out, err = await ctl(daemon, "rescue", "off")
        assert rc == 0 and "rescue off" in out, out + err
        rc, out, err = await ctl(daemon, "rescue", "16M")
        assert rc == 0 and "rescue on (margin 16M)" in out, out + err
        for bad in ("lots", "0"):
            rc, out, err = await ctl(daemon, "rescue", bad)
            assert rc == 1 and "margin" in err, err
        rc, out, _ = await ctl(daemon, "resize", "256M", "--json")
        assert rc == 0 and json.loads(out)["requested_size"] == 256 * MiB
        rc, out, _ = await ctl(daemon, "reserve", "auto", "--json")
        assert rc == 0 and json.loads(out)["reserve_default"] is True
        rc, out, _ = await ctl(daemon, "resize", "1G", "--force")
        assert rc == 0 and "requested 1G" in out
        guest_scope.cancel()  # the guest stops before its device goes
        await guest_done.wait()
        await fe.close()
        fe.release()
    finally:
        assert daemon.stop() == 0
