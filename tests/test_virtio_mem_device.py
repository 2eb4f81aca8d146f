"""The virtio-mem device over the in-memory fake host: no socket, no fds, no
engine. Requests in, responses or host work out; the fake host does the work."""

from __future__ import annotations

import errno

import pytest

from vmemdev.errors import ConfigError
from vmemdev.host.fake import FakeHost, FakeMemory
from vmemdev.host.interface import CgroupReading
from vmemdev.protocol.virtio_mem import BlockState, MemRequest, MemResponse, RequestType, ResponseType
from vmemdev.virtio_mem.device import HostWork, VirtioMem
from vmemdev.virtio_mem.limits import Limits
from vmemdev.virtio_mem.model import Geometry

MiB = 1 << 20
B = 2 * MiB
A = 4 << 30
R = 256 * MiB


class FakeCgroup:
    path = "/fake"
    version = 2

    def __init__(self, room: int | None):
        self.room = room

    def read(self) -> CgroupReading:
        return CgroupReading(None if self.room is None else 1 << 30, 0)

    def check_headroom(self, size: int) -> str | None:
        return None if self.room is None or size <= self.room else f"only {self.room} bytes of headroom"


class Device:
    def __init__(self, requested=64 * MiB, **options):
        self.host = FakeHost()
        self.events: list[tuple[str, dict]] = []
        self.dev = VirtioMem(Geometry(A, R, B), requested, host=self.host,
                             publish=lambda event, /, **data: self.events.append((event, data)), **options)
        self.dev.attach(FakeMemory([(A, R)]))

    def request(self, type_, addr=0, nb=0) -> MemResponse:
        step = self.dev.begin(MemRequest(type_, addr, nb).pack(), 10)
        if isinstance(step, HostWork):
            step = self.dev.finish(step, step.run(self.host))
        return MemResponse.unpack(step)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def test_plug_without_prealloc_needs_no_host_work():
    d = Device()
    step = d.dev.begin(MemRequest(RequestType.PLUG, A, 4).pack(), 10)
    assert isinstance(step, bytes) and MemResponse.unpack(step).type == ResponseType.ACK
    assert d.dev.plugged_size == 4 * B and d.host.calls == []


def test_prealloc_populates_before_the_ack():
    d = Device(prealloc=True)
    step = d.dev.begin(MemRequest(RequestType.PLUG, A, 4).pack(), 10)
    assert isinstance(step, HostWork) and step.populate and d.dev.plugged_size == 0
    assert d.dev.finish(step, step.run(d.host)) == MemResponse(ResponseType.ACK).pack()
    assert d.dev.plugged_size == 4 * B and d.dev.footprint().allocated == 4 * B


def test_a_failed_populate_is_busy_and_rolled_back():
    d = Device(prealloc=True)
    d.host.fail_next["populate"] = errno.ENOMEM
    assert d.request(RequestType.PLUG, A, 4).type == ResponseType.BUSY
    assert d.dev.plugged_size == 0 and d.dev.footprint().allocated == 0
    assert d.dev.stats.busy_by_reason["prealloc-failed"] == 1 and "BUSY" in d.names()


def test_unplug_discards_then_commits():
    d = Device()
    d.request(RequestType.PLUG, A, 8)
    d.host.touch(A, 8 * B)  # the guest wrote it
    assert d.request(RequestType.UNPLUG, A + 4 * B, 4).type == ResponseType.ACK
    fp = d.dev.footprint()
    assert fp.allocated == 4 * B and fp.outside_plugged == 0 and fp.extents == ((A, 4 * B),)
    assert d.dev.stats.bytes_discarded == 4 * B


def test_a_failed_discard_is_busy_and_keeps_the_blocks():
    d = Device()
    d.request(RequestType.PLUG, A, 8)
    d.host.touch(A, 8 * B)
    d.host.fail_next["discard"] = errno.EIO
    assert d.request(RequestType.UNPLUG, A, 8).type == ResponseType.BUSY
    assert d.dev.plugged_size == 8 * B and d.dev.footprint().allocated == 8 * B
    assert d.request(RequestType.STATE, A, 8) == MemResponse(ResponseType.ACK, BlockState.PLUGGED)


def test_unplug_all_discards_the_whole_region():
    d = Device()
    d.request(RequestType.PLUG, A, 2)
    d.host.touch(A, R)  # even data outside plugged blocks goes
    assert d.request(RequestType.UNPLUG_ALL).type == ResponseType.ACK
    assert d.dev.plugged_size == 0 and d.dev.footprint().allocated == 0


def test_memory_max_nacks_with_an_event():
    d = Device(requested=8 * B)
    with pytest.raises(ConfigError, match="above memory.max"):
        Device(requested=8 * B, limits=Limits(memory_max=4 * B))
    # set-limit lowers requested with it, so the model NACKs first; the device
    # still checks memory.max itself in case requested was ever above it.
    d.dev.limits.memory_max = 4 * B
    assert d.request(RequestType.PLUG, A, 5).type == ResponseType.NACK
    assert d.dev.stats.nacks_by_reason["memory.max"] == 1 and "PLUG_NACKED" in d.names()
    assert d.dev.set_limit("memory.max", 6 * B) is True and d.dev.requested_size == 6 * B


def test_cgroup_without_room_is_busy_not_nack():
    d = Device(cgroup=FakeCgroup(room=B))
    assert d.request(RequestType.PLUG, A, 1).type == ResponseType.ACK
    assert d.request(RequestType.PLUG, A + B, 2).type == ResponseType.BUSY
    assert d.dev.stats.busy_by_reason["cgroup"] == 1


def test_unshared_region_is_busy():
    d = Device()
    d.dev.attach(None)
    assert d.request(RequestType.PLUG, A, 1).type == ResponseType.BUSY
    assert d.dev.stats.busy_by_reason["region-not-shared"] == 1


@pytest.mark.parametrize("data, writable", [(b"\x00" * 23, 10), (MemRequest(RequestType.PLUG, A, 1).pack(), 9),
                                            (MemRequest(7, A, 1).pack(), 10)])
def test_malformed_requests_are_returned_unused(data, writable):
    d = Device()
    assert d.dev.begin(data, writable) == b"" and d.dev.plugged_size == 0


def test_memory_high_lowers_requested_size():
    d = Device(requested=16 * B)
    d.request(RequestType.PLUG, A, 16)
    d.host.touch(A, 16 * B)
    assert d.dev.set_limit("memory.high", 8 * B) is True  # config changed: notify the driver
    assert d.dev.requested_size == 8 * B and d.dev.plugged_size == 16 * B  # nothing taken behind its back
    assert d.names()[-2:] == ["LIMIT_CHANGED", "MEMORY_HIGH_EXCEEDED"]


def test_limits_refuse_values_off_the_block_grid():
    d = Device()
    with pytest.raises(ConfigError, match="not a multiple of the block size"):
        d.dev.set_limit("memory.max", B + 4096)
    with pytest.raises(ConfigError, match="unknown limit"):
        d.dev.set_limit("memory.low", B)
