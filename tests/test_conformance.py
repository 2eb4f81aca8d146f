"""The conformance cases of shared/docs/virtio-mem-device.md, numbered as there.

Each runs over a real Unix socket against the real daemon code, with real
memfds for guest RAM and the DIMM, real eventfds for kick and call, and the
real cffi shim discarding memory. B = 2 MiB, A = 4 GiB, R = 1 GiB.
"""

from __future__ import annotations

import random
import struct

import pytest
import trio

from vmemdev.errors import ConfigError
from vmemdev.host import native
from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.virtio_mem import (
    CONFIG_SIZE,
    BlockState,
    MemRequest,
    RequestType,
    ResponseType,
)
from vmemdev.testing.frontend import Frontend

from .conftest import A, B, GiB, MiB, R, attach, settle, start_daemon

ACK, NACK, BUSY, ERROR = (ResponseType.ACK, ResponseType.NACK, ResponseType.BUSY, ResponseType.ERROR)
PLUGGED, UNPLUGGED, MIXED = BlockState.PLUGGED, BlockState.UNPLUGGED, BlockState.MIXED


def touch(fe: Frontend, gpa: int, size: int, byte: int = 0xA5) -> None:
    """The guest writes every page of [gpa, gpa + size)."""
    fe.ram.write(gpa, bytes([byte]) * size)


def blocks_with_data(fe: Frontend) -> set[int]:
    """Indexes of DIMM blocks that have any host allocation (SEEK_DATA)."""
    found = set()
    for off, length in fe.dimm_extents():
        found.update(range(off // B, (off + length - 1) // B + 1))
    return found


async def resize(service, fe, size: int) -> None:
    before = fe.config_changes
    service.resize(size)
    with trio.fail_after(5):
        while fe.config_changes == before:
            await fe.wait_config_change()


# 1 -------------------------------------------------------------------------
async def test_01_config_layout(attached):
    service, fe = attached
    service.resize(256 * MiB)
    reply = await fe.call(vu.Request.GET_CONFIG, vu.encode_config(0, bytes(CONFIG_SIZE)))
    raw = reply[12:]
    assert len(raw) == CONFIG_SIZE == 56
    block, node, pad, addr, region, usable, plugged, requested = struct.unpack("<QH6sQQQQQ", raw)
    assert (block, node, pad, addr, region) == (B, 0, bytes(6), A, R)
    assert (usable, plugged, requested) == (512 * MiB, 0, 256 * MiB)
    for size in (addr, region, usable, plugged, requested):
        assert size % B == 0
    # A partial read returns exactly the bytes asked for, from the same state.
    part = await fe.call(vu.Request.GET_CONFIG, vu.encode_config(48, bytes(8)))
    assert part == vu.encode_config(48, struct.pack("<Q", 256 * MiB))


# 2 -------------------------------------------------------------------------
async def test_02_fresh_device_is_unplugged(nursery, tmp_path):
    service, path = await start_daemon(nursery, tmp_path, requested=256 * MiB)
    fe = await attach(nursery, service, path)
    cfg = await fe.get_config()
    assert cfg.plugged_size == 0
    assert await fe.state(A, cfg.usable_region_size // B) == (ACK, UNPLUGGED)
    await fe.close()
    fe.release()


# 3 -------------------------------------------------------------------------
async def test_03_plug_with_requested_zero(attached):
    service, fe = attached
    assert (await fe.get_config()).usable_region_size == 0
    assert await fe.plug(A, 1) == ERROR  # U = 0: the range is invalid
    await resize(service, fe, 256 * MiB)
    await resize(service, fe, 0)
    assert (await fe.get_config()).usable_region_size > 0
    assert await fe.plug(A, 1) == NACK  # U > 0: over the requested size


# 4, 5 ----------------------------------------------------------------------
async def test_04_05_resize_notifies_once_plug_does_not(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    await settle()
    assert fe.config_changes == 1
    cfg = await fe.get_config()
    assert 256 * MiB <= cfg.usable_region_size <= R
    assert await fe.plug(A, 1) == ACK
    await settle()
    assert (await fe.get_config()).plugged_size == B
    assert fe.config_changes == 1


# 6 - 12 --------------------------------------------------------------------
async def test_06_to_12_invalid_ranges(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    usable = (await fe.get_config()).usable_region_size
    assert await fe.plug(A, 1) == ACK
    assert await fe.plug(A, 1) == ERROR  # 6: already plugged
    assert await fe.plug(A + B, 0) == ERROR  # 7: nb_blocks 0
    assert await fe.plug(A + 4096, 1) == ERROR  # 8: unaligned
    assert await fe.plug(A - B, 1) == ERROR  # 9: below the region
    assert await fe.plug(A + usable - B, 2) == ERROR  # 10: crosses the end of U
    assert await fe.plug(A + usable, 1) == ERROR  # 11: inside R, beyond U
    assert await fe.plug((1 << 64) - B, 1) == ERROR  # 12: would overflow
    assert await fe.plug((1 << 64) - B, 0xFFFF) == ERROR
    assert (await fe.get_config()).plugged_size == B
    for rtype in (RequestType.UNPLUG, RequestType.STATE):
        resp = await fe.request(rtype, (1 << 64) - B, 2)
        assert resp.type == ERROR


# 13 ------------------------------------------------------------------------
async def test_13_nb_blocks_65535_is_not_truncated(nursery, tmp_path):
    service, path = await start_daemon(nursery, tmp_path, size=256 * GiB, requested=128 * GiB)
    fe = await attach(nursery, service, path)
    assert await fe.plug(A, 0xFFFF) == ACK
    cfg = await fe.get_config()
    assert cfg.plugged_size == 0xFFFF * B
    assert await fe.state(A, 0xFFFF) == (ACK, PLUGGED)
    assert await fe.state(A + 0xFFFF * B, 1) == (ACK, UNPLUGGED)
    assert await fe.unplug(A, 0xFFFF) == ACK
    assert (await fe.get_config()).plugged_size == 0
    await fe.close()
    fe.release()


# 14 ------------------------------------------------------------------------
async def test_14_plug_over_partly_plugged_range(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    assert await fe.plug(A + 2 * B, 1) == ACK
    assert await fe.plug(A, 4) == ERROR
    assert await fe.state(A, 2) == (ACK, UNPLUGGED)
    assert await fe.state(A + 3 * B, 1) == (ACK, UNPLUGGED)
    assert (await fe.get_config()).plugged_size == B


# 15, 16, 17 ----------------------------------------------------------------
async def test_15_16_17_requested_limit(attached):
    service, fe = attached
    await resize(service, fe, 8 * B)
    assert await fe.plug(A, 9) == NACK  # 15: over requested, nothing changes
    assert (await fe.get_config()).plugged_size == 0
    assert await fe.plug(A, 8) == ACK  # 16: exactly requested
    assert await fe.plug(A + 8 * B, 1) == NACK
    assert await fe.plug(A + 4096, 100) == ERROR  # 17: bad range and over the limit
    assert await fe.plug(A + R, 1) == ERROR


# 18, 19, 20 ----------------------------------------------------------------
async def test_18_unplug_gives_memory_back(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    assert await fe.plug(A, 64) == ACK
    touch(fe, A, 64 * B)
    before = fe.dimm_allocated()
    assert before == 64 * B
    assert await fe.unplug(A + 16 * B, 16) == ACK
    assert fe.dimm_allocated() == before - 16 * B  # exactly the unplugged amount
    assert blocks_with_data(fe) == set(range(0, 16)) | set(range(32, 64))
    assert (await fe.get_config()).plugged_size == 48 * B


async def test_19_unplug_of_unplugged_or_mixed(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    assert await fe.plug(A, 4) == ACK
    touch(fe, A, 4 * B)
    assert await fe.unplug(A + 4 * B, 1) == ERROR
    assert await fe.unplug(A + 2 * B, 4) == ERROR  # mixed
    assert (await fe.get_config()).plugged_size == 4 * B
    assert fe.dimm_allocated() == 4 * B
    assert fe.ram.read(A, 4 * B) == b"\xa5" * (4 * B)


async def test_20_unplug_while_over_requested(attached):
    service, fe = attached
    await resize(service, fe, 64 * B)
    assert await fe.plug(A, 64) == ACK
    await resize(service, fe, 8 * B)
    assert await fe.unplug(A + 60 * B, 4) == ACK
    assert await fe.plug(A + 60 * B, 1) == NACK  # still above requested


# 21 ------------------------------------------------------------------------
async def test_21_state(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    assert await fe.plug(A, 4) == ACK
    for nb, expected in ((4, PLUGGED), (8, MIXED)):
        data, used_len = await fe.submit(MemRequest(RequestType.STATE, A, nb).pack())
        assert used_len == 10
        assert struct.unpack("<H6xH", data) == (ACK, expected)
    assert await fe.state(A + 4 * B, 4) == (ACK, UNPLUGGED)


# 22 ------------------------------------------------------------------------
async def test_22_padding_is_ignored(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    plug = struct.pack("<H6sQH6s", RequestType.PLUG, b"\xee" * 6, A, 2, b"\xdd" * 6)
    data, used_len = await fe.submit(plug)
    assert (used_len, struct.unpack("<H6xH", data)[0]) == (10, ACK)
    unplug_all = struct.pack("<H6sQH6s", RequestType.UNPLUG_ALL, b"\x11" * 6, 0xDEAD, 77, b"\x22" * 6)
    data, used_len = await fe.submit(unplug_all)
    assert struct.unpack("<H6xH", data)[0] == ACK
    assert (await fe.get_config()).plugged_size == 0


# 23 ------------------------------------------------------------------------
async def test_23_unplug_all(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    assert await fe.plug(A, 64) == ACK
    assert await fe.plug(A + 64 * B, 32) == ACK
    touch(fe, A, 96 * B)
    assert fe.dimm_allocated() == 96 * B
    assert await fe.unplug_all() == ACK
    cfg = await fe.get_config()
    assert cfg.plugged_size == 0
    assert fe.dimm_allocated() == 0 and fe.dimm_extents() == []
    assert await fe.unplug_all() == ACK  # nothing plugged


# 24, 25 --------------------------------------------------------------------
async def test_24_lowering_requested_keeps_usable_and_blocks(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    assert await fe.plug(A, 64) == ACK
    usable = (await fe.get_config()).usable_region_size
    await resize(service, fe, 64 * MiB)
    cfg = await fe.get_config()
    assert (cfg.usable_region_size, cfg.plugged_size, cfg.requested_size) == (usable, 64 * B, 64 * MiB)
    assert fe.config_changes == 2


async def test_25_raising_requested_grows_usable_in_the_same_update(attached):
    service, fe = attached
    await resize(service, fe, 128 * MiB)
    assert (await fe.get_config()).usable_region_size == 384 * MiB
    await resize(service, fe, 512 * MiB)
    await settle()
    cfg = await fe.get_config()
    assert (cfg.requested_size, cfg.usable_region_size) == (512 * MiB, 768 * MiB)
    assert fe.config_changes == 2  # one notification for both fields


# 26 ------------------------------------------------------------------------
async def test_26_host_api_rejects_bad_sizes(attached):
    service, fe = attached
    with pytest.raises(ConfigError, match="not a multiple of the block size"):
        service.resize(B + 4096)
    with pytest.raises(ConfigError, match="larger than the region"):
        service.resize(R + B)
    await settle()
    assert fe.config_changes == 0
    assert (await fe.get_config()).requested_size == 0


# 27 ------------------------------------------------------------------------
async def test_27_device_reset_keeps_state(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    assert await fe.plug(A, 8) == ACK
    touch(fe, A, 8 * B, 0x3C)
    # What QEMU does on a guest reset: stop the ring, reset status, start again.
    last_avail = await fe.stop()
    assert last_avail == fe.ring.avail_idx
    await fe.call(vu.Request.SET_STATUS, vu.encode_u64(0))
    await fe.call(vu.Request.RESET_OWNER)
    await fe.start()
    cfg = await fe.get_config()
    assert cfg.plugged_size == 8 * B
    assert await fe.state(A, 8) == (ACK, PLUGGED)
    assert fe.ram.read(A, 8 * B) == b"\x3c" * (8 * B)
    assert fe.dimm_allocated() == 8 * B


# 28 ------------------------------------------------------------------------
async def test_28_discard_failure_answers_busy(attached):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    assert await fe.plug(A, 16) == ACK
    touch(fe, A, 16 * B)
    with native.inject_fault("punch", 5):  # EIO
        assert await fe.unplug(A, 8) == BUSY
    assert await fe.state(A, 16) == (ACK, PLUGGED)
    assert fe.dimm_allocated() == 16 * B
    with native.inject_fault("punch", 22):  # EINVAL
        assert await fe.unplug_all() == BUSY
    assert (await fe.get_config()).plugged_size == 16 * B
    assert fe.ram.read(A, 16 * B) == b"\xa5" * (16 * B)
    assert await fe.unplug(A, 8) == ACK  # the fault is gone: works again
    assert fe.dimm_allocated() == 8 * B


async def test_28_unshared_region_answers_busy_not_error(nursery, tmp_path, caplog):
    service, path = await start_daemon(nursery, tmp_path, requested=256 * MiB)
    fe = await attach(nursery, service, path, dimm=False)
    assert await fe.plug(A, 1) == BUSY
    assert await fe.unplug_all() == ACK  # nothing plugged, nothing to give back
    assert (await fe.get_config()).plugged_size == 0
    assert "not backed by shared memory" in caplog.text
    assert "share=on" in caplog.text and "pc-dimm" in caplog.text
    await fe.close()
    fe.release()


# 29 ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_bytes, response_len, reason",
    [
        (MemRequest(RequestType.PLUG, A, 1).pack()[:23], 10, "shorter than 24"),
        (MemRequest(RequestType.PLUG, A, 1).pack(), 9, "shorter than the 10-byte response"),
        (MemRequest(7, A, 1).pack(), 10, "unknown request type 7"),
    ],
)
async def test_29_driver_bugs_touch_nothing(attached, caplog, request_bytes, response_len, reason):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    data, used_len = await fe.submit(request_bytes, response_len)
    assert used_len == 0
    assert data == b"\xff" * response_len  # the response buffer was not written
    assert reason in caplog.text
    assert (await fe.get_config()).plugged_size == 0
    assert await fe.plug(A, 1) == ACK  # the device keeps serving


async def test_29_read_only_response_buffer(attached, caplog):
    service, fe = attached
    await resize(service, fe, 256 * MiB)
    ring = fe.ring
    fe.ram.write(fe.req_gpa, MemRequest(RequestType.PLUG, A, 1).pack())
    fe.ram.write(fe.resp_gpa, b"\xff" * 16)
    ring.write_desc(0, fe.req_gpa, 24, 1, 1)
    ring.write_desc(1, fe.resp_gpa, 10, 0, 0)  # not WRITE
    ring.publish(0)
    fe.kick()
    assert await fe.wait_used() == (0, 0)
    assert fe.ram.read(fe.resp_gpa, 16) == b"\xff" * 16
    assert "writable space is 0 bytes" in caplog.text
    assert (await fe.get_config()).plugged_size == 0


# 30 ------------------------------------------------------------------------
async def test_30_random_sequences_against_a_model(attached):
    """Random requests; after each: plugged = popcount x B, host data only in
    plugged blocks, every plugged block still holds what was written to it."""
    service, fe = attached
    rng = random.Random(30)
    nblocks = 128
    await resize(service, fe, 96 * B)
    usable_blocks = (await fe.get_config()).usable_region_size // B
    model: set[int] = set()
    requested_blocks = 96
    for step in range(400):
        op = rng.choices(["plug", "unplug", "state", "unplug_all", "resize"], [8, 6, 2, 1, 1])[0]
        first = rng.randrange(0, nblocks)
        nb = rng.randrange(1, 12)
        rng_blocks = set(range(first, first + nb))
        in_range = first + nb <= usable_blocks
        if op == "plug":
            resp = await fe.plug(A + first * B, nb)
            if not in_range:
                assert resp == ERROR
            elif len(model) + nb > requested_blocks:
                assert resp == NACK
            elif rng_blocks & model:
                assert resp == ERROR
            else:
                assert resp == ACK
                model |= rng_blocks
                for i in rng_blocks:
                    touch(fe, A + i * B, B, i)
        elif op == "unplug":
            resp = await fe.unplug(A + first * B, nb)
            expected = ACK if in_range and rng_blocks <= model else ERROR
            assert resp == expected
            if resp == ACK:
                model -= rng_blocks
        elif op == "state":
            resp_type, state = await fe.state(A + first * B, nb)
            if in_range:
                inside = len(rng_blocks & model)
                assert (resp_type, state) == (
                    ACK,
                    PLUGGED if inside == nb else UNPLUGGED if inside == 0 else MIXED,
                )
            else:
                assert resp_type == ERROR
        elif op == "unplug_all":
            assert await fe.unplug_all() == ACK
            model.clear()
            usable_blocks = (await fe.get_config()).usable_region_size // B
        else:
            requested_blocks = rng.randrange(0, 120)
            service.resize(requested_blocks * B)
            usable_blocks = (await fe.get_config()).usable_region_size // B
        assert (await fe.get_config()).plugged_size == len(model) * B == service.device.plugged_size
        assert blocks_with_data(fe) <= model, f"step {step}: host data outside plugged blocks"
        if step % 20 == 0 or op in ("unplug", "unplug_all"):
            for i in model:
                assert fe.ram.read(A + i * B, 8) == bytes([i]) * 8, f"block {i} changed"
