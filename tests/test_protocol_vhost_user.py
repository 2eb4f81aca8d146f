"""vhost-user wire format: byte-exact against QEMU 11.1.3's capture, and hostile payloads."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmemdev.errors import PeerError
from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.vhost_user import Request

from .capture import ALL_CAPTURES, load

CAPTURE = load()
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def fake_fds(n: int) -> tuple[int, ...]:
    return tuple(range(1000, 1000 + n))


@pytest.mark.parametrize("capture", ALL_CAPTURES, ids=lambda p: p.stem)
def test_every_captured_frontend_message_decodes(capture):
    seen = set()
    for msg in (c for c in load(capture) if c.frontend):
        decoded = vu.decode(msg.request, msg.flags, msg.payload, fake_fds(msg.nfds))
        assert decoded.request == msg.request
        seen.add(Request(msg.request).name)
    # The capture covers the whole lifecycle QEMU drives.
    assert {"GET_FEATURES", "SET_BACKEND_REQ_FD", "ADD_MEM_REG", "SET_VRING_ADDR",
            "SET_VRING_ENABLE", "GET_VRING_BASE", "GET_CONFIG", "SET_STATUS"} <= seen


def test_captured_payloads_decode_to_the_values_qemu_sent():
    adds = [c for c in CAPTURE if c.frontend and c.request == Request.ADD_MEM_REG]
    regions = [vu.decode(c.request, c.flags, c.payload, fake_fds(1)).body for c in adds]
    assert [(r.guest_phys_addr, r.memory_size, r.mmap_offset) for r in regions] == [
        (0, 0xA0000, 0),
        (0xC0000, 0x1FF40000, 0xC0000),
        (0x1_0000_0000, 0x4000_0000, 0),
    ]
    addr_msg = next(c for c in CAPTURE if c.frontend and c.request == Request.SET_VRING_ADDR)
    addr = vu.decode(addr_msg.request, addr_msg.flags, addr_msg.payload, ()).body
    assert addr.index == 0 and addr.flags == 0
    assert addr.avail_user_addr - addr.desc_user_addr == 64 * 16
    num = next(c for c in CAPTURE if c.frontend and c.request == Request.SET_VRING_NUM)
    assert vu.decode(num.request, num.flags, num.payload, ()).body == vu.VringState(0, 64)
    cfg = next(c for c in CAPTURE if c.request == Request.GET_CONFIG and c.frontend)
    assert vu.decode(cfg.request, cfg.flags, cfg.payload, ()).body == vu.ConfigSpace(0, 56, 0, bytes(56))


def test_encoders_reproduce_captured_bytes():
    for c in CAPTURE:
        if c.frontend and c.request == Request.ADD_MEM_REG:
            region = vu.decode(c.request, c.flags, c.payload, fake_fds(1)).body
            assert vu.encode_single_region(region) == c.payload
        if c.frontend and c.request == Request.SET_VRING_ADDR:
            addr = vu.decode(c.request, c.flags, c.payload, ()).body
            assert vu.encode_vring_addr(addr) == c.payload
        if not c.frontend:
            assert c.flags == vu.REPLY_FLAGS
            header = vu.encode_reply(c.request, c.payload)
            assert vu.HEADER.unpack(header[:12]) == (c.request, 5, len(c.payload))
        if not c.frontend and c.request == Request.GET_CONFIG:
            offset, size, flags = vu.CONFIG_HEADER.unpack_from(c.payload)
            assert vu.encode_config(offset, c.payload[12:], flags) == c.payload


@given(u32, u32, st.integers(0, vu.MAX_PAYLOAD))
def test_header_construct_and_struct_agree(request, flags, size):
    raw = vu.HEADER.pack(request, flags, size)
    assert vu.HeaderStruct.build(dict(request=request, flags=flags, size=size)) == raw
    parsed = vu.HeaderStruct.parse(raw)
    assert (parsed.request, parsed.flags, parsed.size) == vu.HEADER.unpack(raw)


@given(u32, u32, u64, u64, u64, u64)
def test_vring_addr_construct_and_struct_agree(index, flags, desc, used, avail, log):
    addr = vu.VringAddr(index, flags, desc, used, avail, log)
    raw = vu.encode_vring_addr(addr)
    built = vu.VringAddrStruct.build(
        dict(index=index, flags=flags, desc_user_addr=desc, used_user_addr=used,
             avail_user_addr=avail, log_guest_addr=log)
    )
    assert built == raw


@given(st.lists(st.tuples(u64, st.integers(1, 2**40), st.integers(0, 2**46), st.integers(0, 2**40)),
                min_size=1, max_size=8))
def test_mem_table_construct_and_struct_agree(regions):
    regs = [vu.MemoryRegion(g % 2**62, s, u, o) for g, s, u, o in regions]
    raw = vu.encode_mem_table(regs)
    parsed = vu.MemTableStruct.parse(raw)
    assert parsed.nregions == len(regs)
    assert [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in parsed.regions] == [
        (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) for r in regs
    ]
    assert vu.decode(Request.SET_MEM_TABLE, 1, raw, fake_fds(len(regs))).body.regions == tuple(regs)


@given(u32, st.binary(max_size=256))
def test_config_construct_and_struct_agree(offset, data):
    raw = vu.encode_config(offset, data)
    parsed = vu.ConfigStruct.parse(raw)
    assert (parsed.offset, parsed.size, parsed.data) == (offset, len(data), data)


@pytest.mark.parametrize(
    "req, payload, nfds, reason",
    [
        (Request.GET_FEATURES, b"\0" * 8, 0, "payload is 8 bytes, expected 0"),
        (Request.SET_FEATURES, b"\0" * 4, 0, "payload is 4 bytes, expected 8"),
        (Request.SET_FEATURES, b"\0" * 8, 1, "came with 1 file descriptors, expected 0"),
        (Request.SET_VRING_KICK, struct.pack("=Q", 0), 0, "expected 1"),
        (Request.SET_VRING_KICK, struct.pack("=Q", 0x100), 1, "expected 0"),
        (Request.SET_VRING_CALL, struct.pack("=Q", 0x200), 1, "unknown bits"),
        (Request.SET_MEM_TABLE, struct.pack("=II", 0, 0), 0, "0 regions"),
        (Request.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(9 * 32), 9, "9 regions"),
        (Request.SET_MEM_TABLE, struct.pack("=II", 2, 0) + bytes(32), 2, "expected 72"),
        (Request.SET_MEM_TABLE, struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 0, 4096, 0, 0), 2,
         "expected 1"),
        (Request.SET_MEM_TABLE, b"\1", 1, "shorter than its 8-byte header"),
        (Request.ADD_MEM_REG, bytes(40), 1, "size 0"),
        (Request.ADD_MEM_REG, struct.pack("=QQQQQ", 0, 2**64 - 4096, 8192, 0, 0), 1, "wraps"),
        (Request.ADD_MEM_REG, bytes(8) + struct.pack("=QQQQ", 0, 4096, 0, 0), 0, "expected 1"),
        (Request.GET_CONFIG, struct.pack("=III", 0, 257, 0) + bytes(257), 0, "> 256"),
        (Request.GET_CONFIG, struct.pack("=III", 0, 56, 0) + bytes(55), 0, "expected 68"),
        (Request.GET_CONFIG, b"\0" * 4, 0, "shorter than 12"),
        (Request.SET_BACKEND_REQ_FD, b"", 0, "expected 1"),
        (Request.SET_VRING_NUM, b"\0" * 9, 0, "expected 8"),
        (Request.SET_LOG_BASE, b"\0" * 8, 0, "unknown or unsupported"),
        (99, b"", 0, "UNKNOWN(99)"),
    ],
)
def test_malformed_payloads_are_refused(req, payload, nfds, reason):
    with pytest.raises(PeerError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        vu.decode(req, 1, payload, fake_fds(nfds))


def test_header_checks_version_and_size():
    with pytest.raises(PeerError, match="version"):
        vu.parse_header(vu.HEADER.pack(1, 0x2, 0))
    with pytest.raises(PeerError, match="exceeds"):
        vu.parse_header(vu.HEADER.pack(1, 0x1, vu.MAX_PAYLOAD + 1))
    assert vu.parse_header(vu.HEADER.pack(24, 0x9, 68)) == (24, 9, 68)


@given(st.integers(0, 60), st.integers(0, 1), st.binary(max_size=300), st.integers(0, 8))
def test_decode_never_fails_other_than_with_a_protocol_error(request, need_reply, payload, nfds):
    try:
        vu.decode(request, 1 | need_reply << 3, payload, fake_fds(nfds))
    except PeerError:
        pass
