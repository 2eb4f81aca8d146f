"""Replaying QEMU 11.1.3's side of a real conversation against the daemon.

Every front-end message of tests/data/qemu-11.1.3-linux-7.2-virtio-mem.jsonl
is sent byte for byte (with real memfds, eventfds and a socketpair standing
in for QEMU's fds), and each answer is compared with what QEMU accepted from
the recorded back-end. The front-end test driver is then checked to send the
same sequence, flags and fd counts as QEMU did.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol import virtio_mem as vm
from vmemdev.protocol.vhost_user import Request
from vmemdev.testing.frontend import Frontend

from .capture import ALL_CAPTURES, load
from .conftest import attach, start_daemon

MiB = 1 << 20
captures = pytest.mark.parametrize("capture", ALL_CAPTURES, ids=lambda p: p.stem)


class FdFactory:
    """Real fds of the kind QEMU passes with each request."""

    def __init__(self):
        self.ram = os.memfd_create("ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram, 512 * MiB)
        self.dimm = os.memfd_create("dimm", os.MFD_CLOEXEC)
        os.ftruncate(self.dimm, 1024 * MiB)
        self.keep: list = []

    def fds_for(self, request: int, payload: bytes, nfds: int) -> list[int]:
        if nfds == 0:
            return []
        if request == Request.SET_BACKEND_REQ_FD:
            ours, theirs = socket.socketpair()
            self.keep += [ours, theirs]
            return [theirs.fileno()]
        if request == Request.ADD_MEM_REG:
            gpa = vu.MEMORY_REGION.unpack_from(payload, 8)[0]
            return [self.dimm if gpa >= 1 << 32 else self.ram]
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        self.keep.append(efd)
        return [efd]

    def close(self):
        for item in self.keep:
            item.close() if hasattr(item, "close") else os.close(item)
        os.close(self.ram)
        os.close(self.dimm)


@captures
async def test_replay_of_qemu_11_1_gets_answers_qemu_accepts(nursery, tmp_path, capture):
    CAPTURE = load(capture)
    service, path = await start_daemon(nursery, tmp_path, requested=256 * MiB)
    fe = Frontend(path)  # used only for its raw socket helpers
    await fe.connect()
    fds = FdFactory()
    answers = 0
    try:
        for i, msg in enumerate(CAPTURE):
            if not msg.frontend:
                continue
            expected = CAPTURE[i + 1] if i + 1 < len(CAPTURE) else None
            if expected is not None and (expected.frontend or expected.request != msg.request):
                expected = None
            if msg.request == Request.GET_CONFIG and expected is not None:
                # Follow the operator's resizes that happened during the recording.
                recorded = vm.Config.unpack(expected.payload[12:])
                if recorded.requested_size != service.device.requested_size:
                    service.resize(recorded.requested_size)
            await fe.send_raw(vu.encode(msg.request, msg.payload, msg.flags),
                              fds.fds_for(msg.request, msg.payload, msg.nfds))
            if expected is None:
                continue
            with trio.fail_after(5):
                reply = await fe.read_reply(msg.request)  # checks flags == 0x5 and request
            answers += 1
            assert len(reply) == len(expected.payload), Request(msg.request).name
            if msg.request == Request.GET_FEATURES:
                ours = vu.U64.unpack(reply)[0]
                recorded = vu.U64.unpack(expected.payload)[0]
                assert ours & recorded == recorded  # we offer the virtio-mem bits on top
            elif msg.request == Request.GET_CONFIG:
                ours, recorded = vm.Config.unpack(reply[12:]), vm.Config.unpack(expected.payload[12:])
                assert reply[:12] == expected.payload[:12]
                # plugged_size differs: the recorded guest plugged through the ring.
                assert (ours.block_size, ours.addr, ours.region_size, ours.requested_size) == (
                    recorded.block_size, recorded.addr, recorded.region_size, recorded.requested_size)
            elif msg.request == Request.GET_VRING_BASE:
                # The recorded guest made requests through the ring; this replay made none.
                assert vu.VRING_STATE.unpack(reply) == (0, 0)
            else:
                assert reply == expected.payload, Request(msg.request).name
        assert answers == sum(1 for c in CAPTURE if not c.frontend)
        assert len(service.frontend.memory.regions) == 3
    finally:
        await fe.close()
        fds.close()
        fe.ram.close()


@captures
async def test_frontend_driver_speaks_like_qemu(nursery, tmp_path, capture):
    CAPTURE = load(capture)
    service, path = await start_daemon(nursery, tmp_path, requested=256 * MiB)
    fe = await attach(nursery, service, path)
    await fe.get_config()
    await fe.stop()
    ours = [(d == "frontend->backend", r, f, n) for d, r, f, _, n in fe.log if r != Request.GET_CONFIG]
    recorded = [(c.frontend, c.request, c.flags, c.nfds) for c in CAPTURE if c.request != Request.GET_CONFIG]
    assert ours == recorded
    # Payload sizes match too (values differ: addresses of another process).
    ours_sizes = [len(p) for d, r, f, p, n in fe.log if d == "frontend->backend"]
    recorded_sizes = [len(c.payload) for c in CAPTURE if c.frontend]
    assert sorted(set(ours_sizes)) == sorted(set(recorded_sizes))
    await fe.close()
    fe.release()
