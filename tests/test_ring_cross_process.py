"""The rings as a real guest sees them: the daemon in its own process serves
tens of thousands of requests while a third process polls used.idx the way a
guest driver may (tests/ring_poller.c, one aligned 16-bit acquire load per
read). Every index it reads must be the last one it saw or a newer one (the
index only moves forward, and the test knows where it stops), and every used
element must be complete when the index moves past it. The virtio spec requires exactly that of the device: the used
element first, then used.idx in one store.

``VMEMDEV_TEST_DAEMON`` (a command, e.g. another checkout's
``/path/.venv/bin/python -P -m vmemdev``) runs the same test against another
build of the daemon.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vmemdev.protocol.virtio_mem import MemRequest, RequestType
from vmemdev.protocol.virtqueue import DESC_F_NEXT, DESC_F_WRITE
from vmemdev.testing.frontend import Frontend

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
A = 1 << 32
DAEMON = shlex.split(os.environ.get("VMEMDEV_TEST_DAEMON", "")) or [sys.executable, "-m", "vmemdev"]


@pytest.fixture(scope="module")
def poller(tmp_path_factory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed for the ring poller (it builds the cffi shim too)"
    out = tmp_path_factory.mktemp("poller") / "ring_poller"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(HERE / "ring_poller.c")], check=True)
    return str(out)


def _pin(pid: int, cpu: int) -> None:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(pid, {cpu})


async def _serve_daemon(tmp_path, nursery):
    path = str(tmp_path / "vm.sock")
    proc = subprocess.Popen(DAEMON + ["serve", "--socket-path", path, "--region-addr", hex(A),
                                      "--region-size", "1G", "--requested-size", "256M",
                                      "--control-socket", "none", "--log-level", "warning"])
    with trio.fail_after(20):
        while not os.path.exists(path):
            assert proc.poll() is None, "the daemon exited at start"
            await trio.sleep(0.02)
    fe = Frontend(path, device_addr=A, device_size=1 << 30)
    await fe.realize()
    nursery.start_soon(fe.watch_backend_channel)
    return proc, fe


async def _drive(fe: Frontend, start: int, total: int, inflight: int) -> None:
    """Keep ``inflight`` STATE requests on the ring until ``total`` are answered."""
    ring, ram = fe.ring, fe.ram
    pairs = ring.num // 2
    reqs, resps = ram.alloc(32 * pairs, 8), ram.alloc(16 * pairs, 8)
    request = MemRequest(RequestType.STATE, A, 1).pack()
    for p in range(pairs):
        ram.write(reqs + 32 * p, request)
        ring.write_desc(2 * p, reqs + 32 * p, len(request), DESC_F_NEXT, 2 * p + 1)
        ring.write_desc(2 * p + 1, resps + 16 * p, 10, DESC_F_WRITE, 0)
    posted = done = 0
    while done < total:
        while posted - done < inflight and posted < total:
            ring.publish(2 * ((start + posted) % pairs))
            posted += 1
        fe.kick()
        while (elem := ring.pop_used()) is None:
            await trio.lowlevel.wait_readable(fe.call_fd)
            try:
                os.eventfd_read(fe.call_fd)
            except BlockingIOError:
                pass
        assert elem == (2 * ((start + done) % pairs), 10)
        done += 1


@pytest.mark.parametrize("start, total, inflight", [(0, 30000, 1), (65000, 20000, 4)],
                         ids=["one-in-flight", "four-in-flight-wrapping"])
async def test_used_index_is_published_whole(nursery, tmp_path, poller, start, total, inflight):
    proc, fe = await _serve_daemon(tmp_path, nursery)
    try:
        ring = fe.ring
        # QEMU restores a ring at SET_VRING_BASE; the used index lives in guest memory.
        ring.avail_idx = ring.used_seen = start
        fe.ram.write(ring.used + 2, start.to_bytes(2, "little"))
        fe.ram.write(ring.avail + 2, start.to_bytes(2, "little"))
        await fe.start()
        stop = (start + total) & 0xFFFF
        watcher = subprocess.Popen(
            [poller, str(fe.ram.ram_fd), str(ring.used), str(ring.num), str(start), str(stop)],
            pass_fds=[fe.ram.ram_fd], stdout=subprocess.PIPE, text=True)
        # The reader spins alone on CPU 0; the daemon and this front-end take turns on CPU 1.
        affinity = os.sched_getaffinity(0)
        _pin(proc.pid, 1)
        _pin(watcher.pid, 0)
        _pin(0, 1)
        try:
            await _drive(fe, start, total, inflight)
        finally:
            os.sched_setaffinity(0, affinity)
        out, _ = await trio.to_thread.run_sync(watcher.communicate)
        reads, moves, torn, bad, first_torn, last = (int(x) for x in out.split())
        assert last == stop and moves > 0 and reads >= moves
        assert torn == 0, f"{torn} of {reads} reads of used.idx were neither old nor new (first {first_torn})"
        assert bad == 0, f"{bad} used elements were incomplete when used.idx moved past them"
        await fe.close()
        fe.release()
    finally:
        proc.terminate()
        await trio.to_thread.run_sync(proc.wait)
