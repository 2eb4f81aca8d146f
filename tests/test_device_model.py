"""The pure device model: sizes, validation order, scale, and a model-based check."""

from __future__ import annotations

import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmemdev.errors import ConfigError
from vmemdev.protocol.virtio_mem import BlockState, MemRequest, RequestType, ResponseType
from vmemdev.virtio_mem.bitmap import BlockBitmap
from vmemdev.virtio_mem.model import Answer, Geometry, Plug, Unplug, UnplugAll, VirtioMemModel

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
B = 2 * MiB
A = 4 * GiB


def device(region=GiB, requested=0, block=B) -> VirtioMemModel:
    return VirtioMemModel(Geometry(A, region, block), requested)


def run(dev: VirtioMemModel, type_, addr, nb):
    decision = dev.decide(MemRequest(type_, addr, nb))
    if isinstance(decision, Answer):
        return decision.response
    return dev.commit(decision)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(addr=A, region_size=GiB, block_size=3 * MiB), "power of two"),
        (dict(addr=A, region_size=GiB, block_size=2048), "power of two >= 4K"),
        (dict(addr=A + 4096, region_size=GiB, block_size=B), "not a multiple"),
        (dict(addr=A, region_size=GiB + 4096, block_size=B), "positive multiple"),
        (dict(addr=A, region_size=0, block_size=B), "positive multiple"),
        (dict(addr=2**64 - B, region_size=2 * B, block_size=B), r"beyond 2\^64"),
        (dict(addr=A, region_size=GiB, block_size=B, node_id=70000), "16 bits"),
    ],
)
def test_geometry_is_validated(kwargs, reason):
    with pytest.raises(ConfigError, match=reason):
        Geometry(**kwargs)


def test_usable_region_follows_qemus_rule():
    dev = device()
    assert dev.usable_region_size == 0
    assert dev.set_requested_size(100 * B) is True
    assert dev.usable_region_size == 100 * B + 256 * MiB
    assert dev.set_requested_size(100 * B) is False  # nothing changed: no notification
    assert dev.set_requested_size(2 * B) is True
    assert dev.usable_region_size == 100 * B + 256 * MiB  # never shrinks on resize
    assert dev.set_requested_size(GiB) is True
    assert dev.usable_region_size == GiB  # capped by the region
    dev.set_requested_size(0)
    assert dev.usable_region_size == GiB
    dev.commit(UnplugAll(0))
    assert dev.usable_region_size == 0  # UNPLUG_ALL may shrink it to the formula


def test_usable_is_rounded_up_to_blocks():
    dev = device(region=8 * GiB, block=128 * MiB)
    dev.set_requested_size(128 * MiB)
    assert dev.usable_region_size == 384 * MiB
    dev = device(region=8 * GiB, block=1 * GiB)
    dev.set_requested_size(GiB)
    assert dev.usable_region_size == 2 * GiB  # 1G + 256M rounded up to a block


def test_validation_order_error_nack_error():
    dev = device(requested=4 * B)
    assert run(dev, RequestType.PLUG, A + 4096, 100).type == ResponseType.ERROR  # range first
    assert run(dev, RequestType.PLUG, A, 5).type == ResponseType.NACK
    assert run(dev, RequestType.PLUG, A, 2).type == ResponseType.ACK
    assert run(dev, RequestType.PLUG, A + B, 2).type == ResponseType.ERROR  # state after NACK
    assert run(dev, RequestType.PLUG, A + B, 3).type == ResponseType.NACK  # NACK before state


def test_decisions_describe_the_host_work():
    dev = device(requested=64 * B)
    assert dev.decide(MemRequest(RequestType.PLUG, A + 2 * B, 3)) == Plug(2, 3, A + 2 * B, 3 * B)
    dev.commit(Plug(2, 3, A + 2 * B, 3 * B))
    assert dev.decide(MemRequest(RequestType.UNPLUG, A + 2 * B, 3)) == Unplug(2, 3, A + 2 * B, 3 * B)
    assert dev.decide(MemRequest(RequestType.UNPLUG_ALL, 0, 0)) == UnplugAll(3 * B)
    with pytest.raises(ValueError):
        dev.decide(MemRequest(9, A, 1))


def test_sixteen_tib_region_costs_the_request_not_the_region():
    """A 16 TiB region of 2 MiB blocks: requests take the same time as on 1 GiB."""
    small = device(region=GiB, requested=GiB)
    huge = device(region=16 * TiB, requested=16 * TiB)
    assert huge.bitmap.nblocks == 8 * 1024 * 1024

    def cost(dev, base):
        start = time.perf_counter()
        for i in range(200):
            addr = base + (i % 8) * 64 * B
            run(dev, RequestType.PLUG, addr, 64)
            run(dev, RequestType.STATE, addr, 64)
            run(dev, RequestType.UNPLUG, addr, 64)
        return time.perf_counter() - start

    # Work near the end of the huge region, where a region-sized walk would show.
    cost(small, A)  # warm up
    t_small = min(cost(small, A) for _ in range(3))
    t_huge = min(cost(huge, A + 16 * TiB - 8 * 64 * B) for _ in range(3))
    # Generous bound: a per-request walk of 8 Mi blocks would be >1000x slower.
    assert t_huge < 20 * t_small + 0.05, (t_small, t_huge)
    assert huge.plugged_size == 0
    assert run(huge, RequestType.PLUG, A + 16 * TiB - B, 1).type == ResponseType.ACK
    assert huge.config().plugged_size == B


def test_bitmap_ranges_and_runs():
    bm = BlockBitmap(100)
    bm.set_range(3, 10)
    bm.set_range(50, 1)
    bm.set_range(90, 10)
    assert bm.count == 21
    assert bm.count_range(0, 100) == 21
    assert bm.count_range(5, 3) == 3
    assert bm.count_range(12, 40) == 2
    assert list(bm.runs()) == [(3, 10), (50, 1), (90, 10)]
    bm.clear_range(5, 2)
    assert list(bm.runs()) == [(3, 2), (7, 6), (50, 1), (90, 10)]
    assert bm.count == 19
    bm.set_range(0, 100)
    assert list(bm.runs()) == [(0, 100)] and bm.count == 100
    with pytest.raises(IndexError):
        bm.set_range(99, 2)
    bm.clear_all()
    assert bm.count == 0 and list(bm.runs()) == []


def test_bitmap_tells_the_bytes_written_since_it_was_last_asked():
    """What a durable copy must be given after each change (daemon/devrecord.py):
    the bytes of the range, not the region."""
    bm = BlockBitmap(1 << 20)
    assert bm.take_touched() is None
    bm.set_range(17, 3)
    assert bm.take_touched() == (2, 3) and bm.take_touched() is None
    bm.set_range(800, 16)
    bm.clear_range(40, 1)
    assert bm.take_touched() == (5, 102)
    assert bm.window(100, 102) == b"\xff\xff"
    bm.clear_range(0, 8)  # nothing was set there: still a write
    assert bm.take_touched() == (0, 1)
    bm.clear_all()  # the bytes ever set, zeroed
    assert bm.take_touched() == (0, 102) and bm.window(0, 102) == bytes(102)
    bm.clear_all()  # nothing set: nothing written
    assert bm.take_touched() is None


class DeviceAgainstReference(RuleBasedStateMachine):
    """Random PLUG/UNPLUG/UNPLUG_ALL/STATE/resize against a set-of-blocks model."""

    NBLOCKS = 96

    def __init__(self):
        super().__init__()
        self.dev = device(region=self.NBLOCKS * B)
        self.plugged: set[int] = set()
        self.requested = 0
        self.usable = 0
        self.seen: tuple[tuple[bytes, int, int], int] | None = None  # the state and its changes count

    def _usable_blocks(self) -> int:
        return self.usable // B

    @rule(size=st.integers(0, NBLOCKS))
    def resize(self, size):
        self.dev.set_requested_size(size * B)
        self.requested = size * B
        if size:
            self.usable = max(self.usable, min(self.NBLOCKS * B, size * B + 256 * MiB))

    @rule(first=st.integers(-2, NBLOCKS + 2), nb=st.integers(0, 20), plug=st.booleans())
    def plug_or_unplug(self, first, nb, plug):
        addr = A + first * B
        resp = run(self.dev, RequestType.PLUG if plug else RequestType.UNPLUG, addr, nb).type
        blocks = set(range(first, first + nb))
        valid = nb > 0 and first >= 0 and first + nb <= self._usable_blocks()
        if not valid:
            assert resp == ResponseType.ERROR
        elif plug and (len(self.plugged) + nb) * B > self.requested:
            assert resp == ResponseType.NACK
        elif plug and blocks & self.plugged or not plug and not blocks <= self.plugged:
            assert resp == ResponseType.ERROR
        else:
            assert resp == ResponseType.ACK
            self.plugged = self.plugged | blocks if plug else self.plugged - blocks

    @rule(first=st.integers(0, NBLOCKS), nb=st.integers(1, 20))
    def state(self, first, nb):
        changes = self.dev.changes
        resp = run(self.dev, RequestType.STATE, A + first * B, nb)
        assert self.dev.changes == changes  # the request path saves nothing for a STATE
        if first + nb > self._usable_blocks():
            assert resp.type == ResponseType.ERROR
            return
        inside = len(set(range(first, first + nb)) & self.plugged)
        expected = BlockState.PLUGGED if inside == nb else BlockState.UNPLUGGED if inside == 0 else BlockState.MIXED
        assert (resp.type, resp.state) == (ResponseType.ACK, expected)

    @rule()
    def unplug_all(self):
        assert run(self.dev, RequestType.UNPLUG_ALL, 0, 0).type == ResponseType.ACK
        self.plugged.clear()
        self.usable = min(self.NBLOCKS * B, self.requested + 256 * MiB) if self.requested else 0

    @invariant()
    def sizes_agree(self):
        cfg = self.dev.config()
        assert cfg.plugged_size == len(self.plugged) * B == self.dev.bitmap.count * B
        assert cfg.usable_region_size == self.usable
        assert cfg.requested_size == self.requested
        assert cfg.usable_region_size >= cfg.requested_size
        assert {i for s, n in self.dev.bitmap.runs() for i in range(s, s + n)} == self.plugged

    @invariant()
    def a_change_grows_changes(self):
        """What the request path's save relies on (daemon/connection.py): the
        state a successor needs changed only if ``changes`` grew."""
        d = self.dev
        now = (d.bitmap.to_bytes(), d.requested_size, d.usable_region_size)
        if self.seen is not None and now != self.seen[0]:
            assert d.changes > self.seen[1]
        self.seen = (now, d.changes)


TestDeviceAgainstReference = DeviceAgainstReference.TestCase
TestDeviceAgainstReference.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
