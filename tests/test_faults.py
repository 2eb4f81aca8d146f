"""Faults: the front-end vanishing at every point, signals mid-discard, syscall failures."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from vmemdev.errors import NativeError
from vmemdev.host import native
from vmemdev.protocol.virtio_mem import MemRequest, MemResponse, RequestType, ResponseType
from vmemdev.protocol.virtqueue import DESC_F_NEXT, DESC_F_WRITE
from vmemdev.testing.frontend import Frontend

from .conftest import A, B, MiB, attach, start_daemon
from .test_ctl_cli import Daemon

GiB = 1 << 30


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Vanish(Exception):
    pass


async def wait_sessions(service, n: int) -> None:
    with trio.fail_after(5):
        while service.sessions_ended < n:
            await trio.sleep(0.01)


async def test_front_end_vanishing_at_every_handshake_boundary(nursery, tmp_path, caplog):
    service, path = await start_daemon(nursery, tmp_path, requested=64 * MiB)
    # Learn the sequence once, then cut it after every message.
    probe = await attach(nursery, service, path)
    total = sum(1 for entry in probe.log if entry[0] == "frontend->backend")
    await probe.close()
    probe.release()
    await wait_sessions(service, 1)
    baseline = open_fds()
    for cut in range(total):
        fe = Frontend(path)
        sent = 0
        original = fe.send_raw

        async def send_raw(data, fds=(), original=original, cut=cut):
            nonlocal sent
            if sent == cut:
                raise Vanish
            sent += 1
            await original(data, fds)

        fe.send_raw = send_raw
        with pytest.raises(Vanish):
            await fe.realize()
            await fe.start()
        await fe.close()
        fe.release()
        await wait_sessions(service, cut + 2)
        assert open_fds() == baseline, f"fds leaked after vanishing at message {cut}"
    # The device is intact and the next front-end works.
    fe = await attach(nursery, service, path)
    assert await fe.plug(A, 4) == ResponseType.ACK
    assert service.device.plugged_size == 4 * B
    await fe.close()
    fe.release()


async def test_front_end_vanishing_in_the_middle_of_a_request(nursery, tmp_path):
    service, path = await start_daemon(nursery, tmp_path, requested=256 * MiB)
    fe = await attach(nursery, service, path)
    assert await fe.plug(A, 64) == ResponseType.ACK
    fe.ram.write(A, b"\x42" * (64 * B))
    # An UNPLUG is made available and kicked, and the front-end is gone at once.
    fe.ram.write(fe.req_gpa, MemRequest(RequestType.UNPLUG, A, 64).pack())
    fe.ring.write_desc(0, fe.req_gpa, 24, DESC_F_NEXT, 1)
    fe.ring.write_desc(1, fe.resp_gpa, 10, DESC_F_WRITE, 0)
    fe.ring.publish(0)
    fe.kick()
    await fe.close()
    await wait_sessions(service, 1)
    # Either the request ran to completion (memory given back, state updated)
    # or it did not start (state and memory untouched): never half of it.
    plugged = service.device.plugged_size
    allocated = fe.dimm_allocated()
    assert (plugged, allocated) in ((0, 0), (64 * B, 64 * B))
    fe.release()
    fe2 = await attach(nursery, service, path)
    assert (await fe2.get_config()).plugged_size == plugged
    await fe2.close()
    fe2.release()


async def test_sigterm_in_the_middle_of_a_large_unplug(nursery, tmp_path):
    """The discard in flight finishes and is answered before the daemon exits."""
    daemon = Daemon(tmp_path, "--region-size", "8G", "--requested-size", "4G")
    fe = Frontend(daemon.sock, device_size=8 * GiB)
    try:
        await fe.realize()
        await fe.start()
        assert await fe.plug(A, 2048) == ResponseType.ACK  # 4 GiB in one request
        native.fallocate(fe.ram.dimm_fd, 0, 4 * GiB)  # the guest "used" all of it
        assert fe.dimm_allocated() == 4 * GiB
        fe.ram.write(fe.req_gpa, MemRequest(RequestType.UNPLUG_ALL, 0, 0).pack())
        fe.ring.write_desc(0, fe.req_gpa, 24, DESC_F_NEXT, 1)
        fe.ring.write_desc(1, fe.resp_gpa, 10, DESC_F_WRITE, 0)
        fe.ring.publish(0)
        fe.kick()
        await trio.sleep(0.005)
        daemon.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            used = await fe.wait_used()
        assert used == (0, 10)
        assert MemResponse.unpack(fe.ram.read(fe.resp_gpa, 10)).type == ResponseType.ACK
        assert fe.dimm_allocated() == 0
        assert daemon.proc.wait(timeout=20) == 0
        assert "received SIGTERM, exiting" in daemon.logs()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        await fe.close()
        fe.release()


async def test_populate_failing_with_the_cgroup_limit_leaves_nothing(nursery, tmp_path):
    """ENOMEM from the kernel mid-populate (a cgroup limit): BUSY, and the part
    that was allocated is punched back."""
    service, path = await start_daemon(nursery, tmp_path, requested=256 * MiB, prealloc=True)
    fe = await attach(nursery, service, path)
    real = native.fallocate

    def half_then_enomem(fd, offset, length):
        real(fd, offset, length // 2)  # really allocate half, as the kernel would
        raise NativeError("fallocate", 12, offset, length)

    native.fallocate = half_then_enomem
    try:
        assert await fe.plug(A, 32) == ResponseType.BUSY
    finally:
        native.fallocate = real
    assert fe.dimm_allocated() == 0 and service.device.plugged_size == 0
    assert await fe.plug(A, 32) == ResponseType.ACK
    assert fe.dimm_allocated() == 32 * B
    await fe.close()
    fe.release()
