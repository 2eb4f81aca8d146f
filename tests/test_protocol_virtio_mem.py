"""virtio-mem structs: the struct hot path and the construct definitions agree."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vmemdev.protocol import virtio_mem as vm

from .capture import load

u16 = st.integers(0, 2**16 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(u64, u16, u64, u64, u64, u64, u64)
def test_config_layouts_agree(block, node, addr, region, usable, plugged, requested):
    cfg = vm.Config(block, node, addr, region, usable, plugged, requested)
    raw = cfg.pack()
    assert len(raw) == vm.CONFIG_SIZE
    assert vm.ConfigStruct.build(
        dict(block_size=block, node_id=node, addr=addr, region_size=region,
             usable_region_size=usable, plugged_size=plugged, requested_size=requested)
    ) == raw
    assert vm.Config.unpack(raw) == cfg


@given(u16, u64, u16)
def test_request_layouts_agree(type_, addr, nb):
    raw = vm.MemRequest(type_, addr, nb).pack()
    assert len(raw) == vm.REQUEST_SIZE
    assert vm.RequestStruct.build(dict(type=type_, addr=addr, nb_blocks=nb)) == raw
    parsed = vm.RequestStruct.parse(raw)
    assert (parsed.type, parsed.addr, parsed.nb_blocks) == (type_, addr, nb)


@given(u16, u16)
def test_response_layouts_agree(type_, state):
    raw = vm.MemResponse(type_, state).pack()
    assert len(raw) == vm.RESPONSE_SIZE
    assert vm.ResponseStruct.build(dict(type=type_, state=state)) == raw


def test_padding_is_ignored_when_parsing():
    raw = bytes([0, 0]) + b"\xee" * 6 + (4 << 30).to_bytes(8, "little") + b"\x40\x00" + b"\xdd" * 6
    assert vm.MemRequest.unpack(raw) == vm.MemRequest(vm.RequestType.PLUG, 4 << 30, 64)


def test_config_replies_in_the_qemu_capture_parse():
    replies = [c for c in load() if not c.frontend and c.request == 24]
    requested = [vm.Config.unpack(r.payload[12:]).requested_size >> 20 for r in replies]
    assert sorted(set(requested)) == [128, 256, 512]
    first = vm.Config.unpack(replies[0].payload[12:])
    assert (first.block_size, first.addr, first.region_size) == (2 << 20, 4 << 30, 1 << 30)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), u16, u16)
def test_descriptor_layouts_agree(addr, length, flags, nxt):
    from vmemdev.protocol.virtqueue import DESC, USED_ELEM, DescStruct, UsedElemStruct

    raw = DESC.pack(addr, length, flags, nxt)
    assert DescStruct.build(dict(addr=addr, len=length, flags=flags, next=nxt)) == raw
    parsed = DescStruct.parse(raw)
    assert (parsed.addr, parsed.len, parsed.flags, parsed.next) == DESC.unpack(raw)
    assert UsedElemStruct.build(dict(id=flags, len=length)) == USED_ELEM.pack(flags, length)
