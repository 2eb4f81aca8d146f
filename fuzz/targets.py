"""Fuzz targets: each takes arbitrary bytes and may only fail in the ways the
daemon handles (a protocol error it logs and answers). Anything else, and
any access outside the guest regions, is a bug.

Used by the coverage-guided runner (``python -m fuzz``, atheris) and by the
hypothesis tests and corpus replays in tests/test_fuzz.py.
"""

from __future__ import annotations

import mmap
import os
import struct

from vmemdev.daemon.commands import execute
from vmemdev.daemon.runtime import DeviceRuntime
from vmemdev.errors import ConfigError, PeerError
from vmemdev.host.fake import FakeHost, FakeMemory
from vmemdev.host.memory import GuestMemory
from vmemdev.protocol import control as control_proto
from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.virtio_mem import REQUEST, MemRequest, RequestType
from vmemdev.protocol.virtqueue import Area, SplitQueue
from vmemdev.sizes import parse_size
from vmemdev.vhost.engine import MAX_MEM_SLOTS, Engine
from vmemdev.vhost.rings import RingState
from vmemdev.virtio_mem.device import VirtioMem
from vmemdev.virtio_mem.model import Answer, Geometry, VirtioMemModel

# --- 1. vhost-user messages ------------------------------------------------------


def vhost_message(data: bytes) -> None:
    """A header, a payload and an fd count as they arrive from the socket."""
    if len(data) < 13:
        return
    try:
        request, flags, size = vu.parse_header(data[:12])
    except PeerError:
        return
    nfds = data[12] % 10
    payload = data[13 : 13 + size]
    fds = tuple(range(1000, 1000 + nfds))
    try:
        msg = vu.decode(request, flags, payload, fds)
    except PeerError:
        return
    assert msg.request == request and len(msg.fds) == nfds


# --- 2. the virtqueue over hostile guest memory ------------------------------------

RING_GPA = 0x10000
RAM_SIZE = 1 << 20
# A second region with a gap before it: buffers may straddle the gap.
HIGH_GPA = RING_GPA + RAM_SIZE + 0x1000


class _Lab:
    """Two memfd regions mapped through the daemon's own GuestMemory."""

    def __init__(self):
        self.memory = GuestMemory(MAX_MEM_SLOTS)
        self.maps = []
        for gpa in (RING_GPA, HIGH_GPA):
            fd = os.memfd_create("fuzz-ram")
            os.ftruncate(fd, RAM_SIZE)
            self.memory.add(vu.MemoryRegion(gpa, RAM_SIZE, 0x7F00_0000_0000 + gpa, 0), fd)
            self.maps.append(mmap.mmap(fd, RAM_SIZE))


_lab: _Lab | None = None


def _get_lab() -> _Lab:
    global _lab
    if _lab is None:
        _lab = _Lab()
    return _lab


def virtqueue(data: bytes) -> None:
    """Descriptor table, avail ring and ring indexes written by a hostile guest."""
    lab = _get_lab()
    if len(data) < 4:
        return
    num = 1 << (data[0] % 6)  # 1..32
    last_avail = struct.unpack_from("<H", data, 1)[0]
    ring = lab.maps[0]
    area = data[3:]
    desc_off, avail_off, used_off = 0, 16 * num, 0x2000
    ring[: desc_off + 16 * num + 4 + 2 * num] = (area + bytes(16 * num + 4 + 2 * num))[: 16 * num + 4 + 2 * num]
    region = lab.memory.regions[0]
    desc, avail, used = (Area(region.mm, off, region.address + off) for off in (desc_off, avail_off, used_off))
    queue = SplitQueue(num, desc, avail, used, lab.memory.ring_access, last_avail)
    # The daemon's own path: the engine takes chains, the device answers (fake host).
    g = Geometry(1 << 32, 1 << 30, 2 << 20)
    device = VirtioMem(g, 256 << 20, host=FakeHost())
    device.attach(FakeMemory([(g.addr, g.region_size)]))
    engine = Engine(device, lab.memory)
    ring = engine.rings[0]
    ring.num, ring.queue, ring.state = num, queue, RingState.RUNNING
    for _ in range(num + 1):
        request = engine.take(0, device.max_request)
        if request is None:
            return
        response = b""
        if request.chain is not None:
            step = device.begin(request.data, request.writable)
            response = step if isinstance(step, bytes) else device.finish(step, step.run(device.host))
            assert len(response) in (0, 10)
        engine.complete(request, response)
        model = device.model
        assert model.plugged_size == model.bitmap.count * model.block_size


# --- 3. virtio-mem requests against the model --------------------------------------

_FUZZ_GEOMETRY = Geometry(1 << 32, 64 << 21, 2 << 20)  # 64 blocks


def mem_requests(data: bytes) -> None:
    """A sequence of 24-byte requests (and resizes) against the model's invariants."""
    device = VirtioMemModel(_FUZZ_GEOMETRY, 0)
    for i in range(0, len(data) - REQUEST.size + 1, REQUEST.size):
        chunk = data[i : i + REQUEST.size]
        request = MemRequest.unpack(chunk)
        if chunk[2] & 1:  # use a padding byte to interleave resizes
            try:
                device.set_requested_size((chunk[3] % 65) * device.block_size)
            except ConfigError:
                raise AssertionError("aligned sizes within the region must be accepted") from None
        if request.type not in RequestType._value2member_map_:
            continue
        # Keep addresses near the region so the interesting cases are reached.
        request = MemRequest(request.type, (1 << 32) + (request.addr % (80 << 21)) - (8 << 21), request.nb_blocks % 80)
        before = device.bitmap.count
        decision = device.decide(request)
        if isinstance(decision, Answer):
            assert device.bitmap.count == before
        else:
            device.commit(decision)
        cfg = device.config()
        assert cfg.plugged_size == device.bitmap.count * cfg.block_size
        assert cfg.usable_region_size <= cfg.region_size


# --- 4. the control protocol ------------------------------------------------------


_service: DeviceRuntime | None = None


def control_line(data: bytes) -> None:
    """One request line from a control client, executed against a device."""
    global _service
    if _service is None:
        _service = DeviceRuntime(Geometry(1 << 32, 1 << 30, 2 << 20))
    try:
        command = control_proto.parse_command(data)
        execute(_service, command)
    except control_proto.CommandError:
        pass
    d = _service.device
    assert d.requested_size <= d.geometry.region_size and d.requested_size % d.geometry.block_size == 0
    if _service.device.limits.memory_max is not None:
        assert d.requested_size <= _service.device.limits.memory_max


def sizes(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        value = parse_size(text)
    except ConfigError:
        return
    assert 0 <= value < 1 << 64


TARGETS = {
    "vhost_message": vhost_message,
    "virtqueue": virtqueue,
    "mem_requests": mem_requests,
    "control_line": control_line,
    "sizes": sizes,
}
