"""`serve --cgroup`: no plug sequence leads to an OOM kill in the VM's cgroup.

Real cgroup v1 children of this process's memory cgroup, a real `vmemdev
serve` process inside them, plugs from one 2 MiB block to 128 MiB requests up
to and past the limit, with and without `--prealloc`, a "guest" that writes
every byte it was given through its own shared mapping of the device memory
(the way a guest's page faults charge QEMU), and another process in the
cgroup growing at the same time. After each run: no OOM kill (oom_kill in
memory.oom_control stays 0), every refusal BUSY, host memory only in
plugged blocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from vmemdev.protocol.virtio_mem import ResponseType
from vmemdev.testing.cgroup import ChildMemoryCgroup

from .test_ctl_cli import A, Daemon, attach_guest, ctl

MiB = 1 << 20
BLOCK = 2 * MiB
LIMIT = 384 * MiB


@pytest.fixture
def vm_cgroup(memory_cgroup):
    memory_cgroup.write("memory.limit_in_bytes", LIMIT)
    return memory_cgroup


# A guest's writes: a process in the VM's cgroup that maps the device memory
# (the memfd whose fd number is argv[1]) and writes whole ranges when told, so the page
# faults are charged to the cgroup as a guest's are charged to QEMU.
TOUCHER = textwrap.dedent("""
    import ctypes, mmap, os, sys
    fd = int(sys.argv[1])
    mm = mmap.mmap(fd, os.fstat(fd).st_size)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    for line in sys.stdin:
        offset, length = map(int, line.split())
        ctypes.memset(base + offset, 0x5A, length)
        print("ok", flush=True)
""")

# Another process in the cgroup that grows by STEP every 5 ms up to TOTAL, then holds it.
GROWER = textwrap.dedent("""
    import sys, time
    total, step = int(sys.argv[1]), int(sys.argv[2])
    held = []
    while sum(map(len, held)) < total:
        held.append(bytearray(b"\\x01" * step))
        time.sleep(0.005)
    print("grown", flush=True)
    time.sleep(3600)
""")


class Toucher:
    """The guest's writes, from a process in the VM's cgroup."""

    def __init__(self, cgroup: ChildMemoryCgroup, dimm_fd: int):
        self.proc = subprocess.Popen([sys.executable, "-c", TOUCHER, str(dimm_fd)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=cgroup.enter,
                                     pass_fds=(dimm_fd,))

    def write(self, offset: int, length: int) -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{offset} {length}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n", f"the guest's writer died: {self.proc.poll()}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_grower(cgroup: ChildMemoryCgroup, total: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", GROWER, str(total), str(MiB)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=cgroup.enter)


async def plug_until_refused(fe, blocks_per_request: int, after_ack=None, extra: int = 3) -> list[int]:
    """Plug request after request from the region's start until refused, then
    `extra` more; returns the answers."""
    answers: list[int] = []
    refused = 0
    step = blocks_per_request * BLOCK
    for i in range(1024 * MiB // step):
        answer = await fe.plug(A + i * step, blocks_per_request)
        answers.append(answer)
        if answer == ResponseType.ACK:
            if after_ack:
                after_ack(i * step, step)
        else:
            refused += 1
            if refused > extra:
                break
    return answers


async def check_after(daemon: Daemon, cgroup: ChildMemoryCgroup, answers: list[int]) -> dict:
    assert cgroup.oom_kills() == 0, "the OOM killer ran in the VM's cgroup"
    # Stronger: no charge ever failed against the limit (each failure means
    # reclaim, and with nothing reclaimable, the OOM killer).
    assert cgroup.failcnt() == 0, "the cgroup hit its limit"
    assert daemon.proc.poll() is None, "the daemon died: " + daemon.logs()
    acks = answers.count(ResponseType.ACK)
    assert acks > 0 and ResponseType.ACK not in answers[acks:], answers
    assert set(answers[acks:]) == {ResponseType.BUSY}, answers
    rc, out, _ = await ctl(daemon, "--json", "stats")
    assert set(json.loads(out)["busy_by_reason"]) == {"cgroup"}, out
    rc, out, _ = await ctl(daemon, "--json", "accounting")
    accounting = json.loads(out)
    assert accounting["allocated_outside_plugged"] == 0, accounting
    return accounting


@pytest.mark.parametrize("blocks_per_request", [1, 64], ids=["2M", "128M"])
async def test_prealloc_never_crosses_the_limit(nursery, tmp_path, vm_cgroup, blocks_per_request):
    """The issue's case: the daemon in a 384 MiB cgroup with --prealloc; its
    fallocate charges the cgroup. Plugs stop with BUSY before the OOM killer."""
    daemon = Daemon(tmp_path, "--cgroup", vm_cgroup.path, "--prealloc",
                    cgroup_procs=vm_cgroup.file("cgroup.procs"))
    try:
        fe, _ = await attach_guest(nursery, daemon, run_guest=False)
        assert (await ctl(daemon, "resize", "1G"))[0] == 0
        answers = await plug_until_refused(fe, blocks_per_request)
        accounting = await check_after(daemon, vm_cgroup, answers)
        assert accounting["host_allocated"] == accounting["plugged_size"]
        # Not needlessly timid: what is left is what the rule keeps back: the
        # refused request, the band and the front-end's boot RAM (64M, never
        # written here, so still owed), with 4M to spare for the overheads.
        left = LIMIT - vm_cgroup.usage()
        assert left < blocks_per_request * BLOCK + 32 * MiB + 64 * MiB + 4 * MiB, left
        await fe.close()
        fe.release()
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("blocks_per_request", [1, 64], ids=["2M", "128M"])
async def test_a_guest_writing_all_it_was_given_is_not_oom_killed(nursery, tmp_path, vm_cgroup,
                                                                blocks_per_request):
    """Without --prealloc a plug costs nothing until the guest writes it. The
    "guest" (a process in the cgroup, like QEMU) writes every block it was
    given, and at the end writes all of it again."""
    daemon = Daemon(tmp_path, "--cgroup", vm_cgroup.path, cgroup_procs=vm_cgroup.file("cgroup.procs"))
    toucher = None
    try:
        fe, _ = await attach_guest(nursery, daemon, run_guest=False)
        toucher = Toucher(vm_cgroup, fe.ram.dimm_file())
        assert (await ctl(daemon, "resize", "1G"))[0] == 0
        answers = await plug_until_refused(fe, blocks_per_request, after_ack=toucher.write)
        plugged = answers.count(ResponseType.ACK) * blocks_per_request * BLOCK
        toucher.write(0, plugged)
        accounting = await check_after(daemon, vm_cgroup, answers)
        assert accounting["host_allocated"] == plugged
        assert toucher.proc.poll() is None
        await fe.close()
        fe.release()
    finally:
        if toucher:
            toucher.stop()
        assert daemon.stop() == 0


@pytest.mark.parametrize("prealloc", [True, False], ids=["prealloc", "guest-writes"])
async def test_another_process_growing_in_the_cgroup(nursery, tmp_path, vm_cgroup, prealloc):
    """A process in the cgroup grows by 24 MiB while the guest plugs 2 MiB
    blocks (and writes them): the plugs make room for it, nobody is killed."""
    args = ("--cgroup", vm_cgroup.path) + (("--prealloc",) if prealloc else ())
    daemon = Daemon(tmp_path, *args, cgroup_procs=vm_cgroup.file("cgroup.procs"))
    toucher = grower = None
    try:
        fe, _ = await attach_guest(nursery, daemon, run_guest=False)
        toucher = Toucher(vm_cgroup, fe.ram.dimm_file())
        assert (await ctl(daemon, "resize", "1G"))[0] == 0
        grower = start_grower(vm_cgroup, 24 * MiB)
        answers = await plug_until_refused(fe, 1, after_ack=toucher.write)
        assert grower.stdout.readline() == "grown\n"
        await check_after(daemon, vm_cgroup, answers)
        assert grower.poll() is None and toucher.proc.poll() is None
        await fe.close()
        fe.release()
    finally:
        for proc in (grower, toucher and toucher.proc):
            if proc:
                proc.kill()
                proc.wait()
        assert daemon.stop() == 0
