"""The virtio-mem device over the in-memory fake host: no socket, no fds, no
engine. Requests in, responses or host work out; the fake host does the work."""

from __future__ import annotations

import errno

import pytest

from vmemdev.errors import ConfigError
from vmemdev.host.fake import FakeHost, FakeMemory
from vmemdev.host.interface import Backing, CgroupReading
from vmemdev.protocol.virtio_mem import BlockState, MemRequest, MemResponse, RequestType, ResponseType
from vmemdev.virtio_mem.device import POPULATE_CHUNK, HostWork, VirtioMem, chunks
from vmemdev.virtio_mem.headroom import HeadroomRule, Unallocated, cost
from vmemdev.virtio_mem.limits import Limits
from vmemdev.virtio_mem.model import Geometry

MiB = 1 << 20
B = 2 * MiB
A = 4 << 30
R = 256 * MiB


class FakeCgroup:
    """A cgroup whose usage follows the fake host's allocation plus ``other``
    (what the rest of the cgroup holds), as a cgroup's page counter would."""

    path = "/fake"
    version = 2

    def __init__(self, limit: int | None, host: FakeHost | None = None, other: int = 0):
        self.limit, self.host, self.other = limit, host, other
        self.reads = 0

    def read(self) -> CgroupReading:
        self.reads += 1
        allocated = len(self.host.pages) * FakeHost.PAGE if self.host else 0
        return CgroupReading(self.limit, self.other + allocated, self.path)


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
    cg = FakeCgroup(limit=cost(B) + MiB)
    d = Device(cgroup=cg, headroom=HeadroomRule(band=MiB))
    assert d.request(RequestType.PLUG, A, 1).type == ResponseType.ACK
    assert d.request(RequestType.PLUG, A + B, 1).type == ResponseType.BUSY
    assert d.dev.stats.busy_by_reason["cgroup"] == 1
    busy = dict(d.events)["BUSY"]
    assert busy["reason"] == "cgroup" and "guest RAM not yet allocated 2.0M" in busy["detail"]


def test_plugged_but_unallocated_memory_counts_as_used():
    """Without --prealloc a plug costs nothing now; the guest's writes are
    charged later, so what is plugged and unwritten is counted already."""
    d = Device()
    cg = FakeCgroup(limit=10 * B, host=d.host)
    d.dev.cgroup, d.dev.headroom = cg, HeadroomRule(band=0)
    for i in range(9):
        assert d.request(RequestType.PLUG, A + i * B, 1).type == ResponseType.ACK
    # 9 blocks plugged, none written: usage 0, but the 10th would not fit with the overhead.
    assert cg.read().usage == 0
    assert d.request(RequestType.PLUG, A + 9 * B, 1).type == ResponseType.BUSY
    report = d.dev.limits_report()["cgroup"]
    assert report["unallocated_plugged"] == 9 * B and report["committed"] == cost(9 * B)
    assert report["room"] == 10 * B - cost(9 * B)
    # The guest writing what it has moves it from "committed" to "usage": no new room.
    d.host.touch(A, 9 * B)
    assert d.dev.limits_report()["cgroup"]["unallocated_plugged"] == 0
    assert d.request(RequestType.PLUG, A + 9 * B, 1).type == ResponseType.BUSY
    # Unplugging gives room back.
    assert d.request(RequestType.UNPLUG, A, 2).type == ResponseType.ACK
    assert d.request(RequestType.PLUG, A + 9 * B, 1).type == ResponseType.ACK


def test_the_band_and_the_overhead_are_reserved():
    rule = HeadroomRule(band=8 * MiB)
    reading = CgroupReading(limit=100 * MiB, usage=40 * MiB, limited_by="/parent")
    a = rule.assess("/vm", reading, Unallocated(plugged=12 * MiB, other=8 * MiB), size=30 * MiB)
    assert a.committed == cost(20 * MiB) == 20 * MiB + 160 * 1024
    assert a.room == 100 * MiB - 40 * MiB - cost(20 * MiB) - 8 * MiB
    assert a.need == cost(30 * MiB) and a.fits
    assert not rule.assess("/vm", reading, Unallocated(20 * MiB, 0), 32 * MiB).fits
    assert "(limited by /parent)" in a.reason() and "band 8M" in a.reason()
    assert rule.assess("/vm", CgroupReading(None, 1 << 40), Unallocated(1 << 40, 0), 1 << 40).fits


def test_untouched_boot_ram_counts_as_used():
    """QEMU's boot RAM that the guest has not written yet is charged when it
    does, like plugged memory: a plug may not take that room."""
    d = Device()
    d.dev.attach(FakeMemory([(0, 64 * MiB), (A, R)]))  # boot RAM at 0, the device region
    cg = FakeCgroup(limit=72 * MiB, host=d.host)
    d.dev.cgroup, d.dev.headroom = cg, HeadroomRule(band=0)
    # 72M - cost(64M untouched) = 7.5M: one block fits, four (8M) would not.
    assert d.request(RequestType.PLUG, A, 4).type == ResponseType.BUSY
    assert d.request(RequestType.PLUG, A, 1).type == ResponseType.ACK
    report = d.dev.limits_report()["cgroup"]
    assert (report["unallocated_other"], report["unallocated_plugged"], report["usage"]) == (64 * MiB, B, 0)
    d.host.touch(0, 64 * MiB)  # the guest wrote its boot RAM: charged now, no longer pending
    report = d.dev.limits_report()["cgroup"]
    assert (report["unallocated_other"], report["usage"]) == (0, 64 * MiB)


def test_prealloc_stops_between_chunks_and_rolls_back():
    """The cgroup fills up while a 128 MiB plug is being preallocated (another
    process grows): the populate stops before the limit, takes back what it
    allocated, and the plug is BUSY with the reason."""
    d = Device(requested=R, prealloc=True)
    cg = FakeCgroup(limit=200 * MiB, host=d.host)
    d.dev.cgroup, d.dev.headroom = cg, HeadroomRule(band=4 * MiB)
    step = d.dev.begin(MemRequest(RequestType.PLUG, A, 64).pack(), 10)
    assert isinstance(step, HostWork) and step.guard is not None
    cg.other = 100 * MiB  # after the decision, before the work
    answer = MemResponse.unpack(d.dev.finish(step, step.run(d.host)))
    assert answer.type == ResponseType.BUSY and d.dev.plugged_size == 0
    assert d.host.pages == set()  # rolled back
    populated = [length for op, _, length in d.host.calls if op == "populate"]
    assert populated and max(populated) <= POPULATE_CHUNK and sum(populated) < 128 * MiB
    assert d.dev.stats.busy_by_reason["cgroup"] == 1
    assert "limit 200M" in dict(d.events)["BUSY"]["detail"]
    # With room, the same plug goes through in chunks, the cgroup read before each.
    cg.other, reads = 0, cg.reads
    assert d.request(RequestType.PLUG, A, 64).type == ResponseType.ACK
    assert cg.reads - reads == 1 + 128 * MiB // POPULATE_CHUNK
    assert d.dev.footprint().allocated == 128 * MiB


def test_chunks_cut_pieces_at_the_chunk_size():
    pieces = [Backing(3, 0, 5 * MiB, 0x1000_0000, A), Backing(4, MiB, 6 * MiB, 0x2000_0000, A + 5 * MiB)]
    out = chunks(pieces, 4 * MiB)
    assert [[(p.fd, p.file_offset, p.length) for p in c] for c in out] == [
        [(3, 0, 4 * MiB)], [(3, 4 * MiB, MiB), (4, MiB, 3 * MiB)], [(4, 4 * MiB, 3 * MiB)]]
    assert out[1][1].gpa == A + 5 * MiB and out[2][0].address == 0x2000_0000 + 3 * MiB


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
