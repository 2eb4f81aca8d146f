"""Malformed vhost-user messages and hostile rings, over the real socket.

Each case checks three things: the daemon logs a clear error, it keeps
serving (this connection where the protocol allows, else the next one), and
nothing outside the guest regions is read or written.
"""

from __future__ import annotations

import os
import struct

import pytest
import trio

from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.vhost_user import Request
from vmemdev.protocol.virtio_mem import MemRequest, RequestType, ResponseType
from vmemdev.protocol.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from vmemdev.testing.frontend import Frontend

from .conftest import A, B, MiB, attach, settle


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def still_serving(service, path, nursery, ended_before: int = 0) -> None:
    """Once the previous front-end is gone, a fresh one attaches and is served."""
    with trio.fail_after(5):
        while service.sessions_ended <= ended_before:
            await trio.sleep(0.01)
        fe = await attach(nursery, service, path)
        assert (await fe.get_config()).block_size == B
        await fe.close()
        fe.release()


async def raw_frontend(path: str) -> Frontend:
    fe = Frontend(path)
    await fe.connect()
    return fe


async def expect_closed(fe: Frontend) -> None:
    with trio.fail_after(5):
        assert await fe.sock.recv(1) == b""


# --- vhost-user messages ---------------------------------------------------------


async def test_truncated_header_then_eof(daemon, nursery, caplog):
    service, path = daemon
    fe = await raw_frontend(path)
    await fe.send_raw(vu.HEADER.pack(1, 1, 0)[:7])
    await fe.close()
    await still_serving(service, path, nursery)
    assert "inside a header (7 of 12 bytes)" in caplog.text
    fe.release()


async def test_truncated_payload_then_eof(daemon, nursery, caplog):
    service, path = daemon
    fe = await raw_frontend(path)
    await fe.send_raw(vu.HEADER.pack(Request.SET_FEATURES, 1, 8) + b"\0\0\0")
    await fe.close()
    await still_serving(service, path, nursery)
    assert "inside SET_FEATURES's payload" in caplog.text
    fe.release()


@pytest.mark.parametrize(
    "header, reason",
    [
        (vu.HEADER.pack(Request.GET_FEATURES, 0x2, 0), "unsupported protocol version"),
        (vu.HEADER.pack(Request.SET_FEATURES, 0x1, 1 << 31), "exceeds"),
    ],
)
async def test_unparseable_header_closes_only_that_connection(daemon, nursery, caplog, header, reason):
    service, path = daemon
    fe = await raw_frontend(path)
    await fe.send_raw(header)
    await expect_closed(fe)
    assert reason in caplog.text
    await fe.close()
    await still_serving(service, path, nursery)
    fe.release()


async def test_wrong_size_with_need_reply_is_answered_failure(daemon, caplog):
    service, path = daemon
    fe = await raw_frontend(path)
    await fe.call(Request.GET_PROTOCOL_FEATURES)
    await fe.call(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(vu.ProtocolFeature.REPLY_ACK))
    reply = await fe.call(Request.SET_FEATURES, b"\0" * 4, need_reply=True)
    assert reply == vu.encode_u64(1)
    assert "payload is 4 bytes, expected 8" in caplog.text
    # The same connection keeps working.
    assert vu.U64.unpack(await fe.call(Request.GET_FEATURES))[0] & vu.VIRTIO_F_VERSION_1
    unknown = await fe.call(99, b"junk", need_reply=True)
    assert unknown == vu.encode_u64(1)
    assert "UNKNOWN(99)" in caplog.text
    bad_ring = await fe.call(Request.SET_VRING_NUM, vu.encode_vring_state(5, 64), need_reply=True)
    assert bad_ring == vu.encode_u64(1)
    assert "ring index 5 out of range" in caplog.text
    bad_num = await fe.call(Request.SET_VRING_NUM, vu.encode_vring_state(0, 100), need_reply=True)
    assert bad_num == vu.encode_u64(1)
    await fe.close()
    fe.release()


@pytest.mark.parametrize(
    "request_, payload",
    [
        (Request.GET_FEATURES, b"\0" * 8),  # a request with its own reply, malformed
        (99, b""),  # unknown, and no NEED_REPLY: the peer might be waiting
        (Request.GET_CONFIG, vu.encode_config(0, bytes(56))),  # CONFIG not negotiated
    ],
)
async def test_unanswerable_requests_close_the_connection(daemon, nursery, caplog, request_, payload):
    service, path = daemon
    fe = await raw_frontend(path)
    await fe.send_raw(vu.encode(request_, payload))
    await expect_closed(fe)
    assert "closing the connection" in caplog.text
    await fe.close()
    await still_serving(service, path, nursery)
    fe.release()


async def test_surplus_and_wrong_fds_are_closed(daemon, caplog):
    service, path = daemon
    fe = await raw_frontend(path)
    await fe.call(Request.GET_PROTOCOL_FEATURES)
    await fe.call(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(vu.ProtocolFeature.REPLY_ACK))
    await fe.call(Request.GET_FEATURES)  # let the connection settle before counting
    baseline = open_fds()
    efds = [os.eventfd(0) for _ in range(3)]
    for _ in range(20):
        reply = await fe.call(Request.SET_VRING_KICK, vu.encode_u64(0), efds[:2], need_reply=True)
        assert reply == vu.encode_u64(1)
        reply = await fe.call(Request.SET_FEATURES, vu.encode_u64(1 << 32), efds, need_reply=True)
        assert reply == vu.encode_u64(1)
    # Nine fds: one more than a message may carry; twenty: more than the
    # peek has room for (MSG_CTRUNC). Refused either way, all closed.
    many = [os.eventfd(0) for _ in range(20)]
    for count in (9, 20):
        reply = await fe.call(Request.SET_FEATURES, vu.encode_u64(1 << 32), many[:count], need_reply=True)
        assert reply == vu.encode_u64(1)
        assert "more file descriptors than 8" in caplog.text
        caplog.clear()
    await settle()
    assert open_fds() == baseline + len(efds) + len(many)  # only ours remain
    for fd in efds + many:
        os.close(fd)
    await fe.close()
    fe.release()


async def test_memory_regions_the_daemon_cannot_safely_map(daemon, caplog):
    service, path = daemon
    fe = await raw_frontend(path)
    await fe.call(Request.GET_PROTOCOL_FEATURES)
    await fe.call(
        Request.SET_PROTOCOL_FEATURES,
        vu.encode_u64(vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIGURE_MEM_SLOTS),
    )
    small = os.memfd_create("small")
    os.ftruncate(small, 4096)
    too_big = vu.MemoryRegion(0, 1 * MiB, 0x7000_0000_0000, 0)
    reply = await fe.call(Request.ADD_MEM_REG, vu.encode_single_region(too_big), [small], need_reply=True)
    assert reply == vu.encode_u64(1)
    assert "the file has 4096" in caplog.text  # would SIGBUS on access
    efd = os.eventfd(0)
    reply = await fe.call(Request.ADD_MEM_REG, vu.encode_single_region(vu.MemoryRegion(0, 4096, 0, 0)),
                          [efd], need_reply=True)
    assert reply == vu.encode_u64(1)
    assert "not backed by a regular file" in caplog.text
    ok = os.memfd_create("ok")
    os.ftruncate(ok, 2 * MiB)
    first = vu.MemoryRegion(0, 2 * MiB, 0x7000_0000_0000, 0)
    assert await fe.call(Request.ADD_MEM_REG, vu.encode_single_region(first), [ok], need_reply=True) == vu.encode_u64(0)
    overlap = vu.MemoryRegion(MiB, 2 * MiB, 0x7100_0000_0000, 0)
    reply = await fe.call(Request.ADD_MEM_REG, vu.encode_single_region(overlap), [ok], need_reply=True)
    assert reply == vu.encode_u64(1)
    assert "overlaps" in caplog.text
    missing = vu.MemoryRegion(64 * MiB, 2 * MiB, 0, 0)
    reply = await fe.call(Request.REM_MEM_REG, vu.encode_single_region(missing), need_reply=True)
    assert reply == vu.encode_u64(1)
    assert len(service.frontend.memory.regions) == 1
    for fd in (small, efd, ok):
        os.close(fd)
    await fe.close()
    fe.release()


async def test_second_front_end_waits_until_the_first_leaves(attached, nursery):
    """A front-end that connects while one is attached is neither served nor
    closed: it waits, the attached one is undisturbed, and it is served as
    soon as the first leaves (its handshake completes then)."""
    service, fe = attached
    second = Frontend(fe.socket_path)
    handshake_done = trio.Event()

    async def handshake():
        await second.realize()
        handshake_done.set()
    nursery.start_soon(handshake)
    await trio.sleep(0.5)
    assert not handshake_done.is_set()
    assert (await fe.get_config()).block_size == B  # the attached front-end is served as before
    await fe.close()  # (the fixture releases its memory)
    with trio.fail_after(5):
        await handshake_done.wait()
    await second.start()
    assert (await second.get_config()).block_size == B
    await second.close()
    second.release()


async def test_a_quick_reconnect_is_served(attached, nursery):
    """Close and connect again at once, as a restarted front-end does: the new
    connection is queued behind the old one's teardown, never reset."""
    service, fe = attached
    path = fe.socket_path
    await fe.close()
    again = await attach(nursery, service, path)
    assert (await again.get_config()).block_size == B
    await again.close()
    again.release()


# --- hostile rings ---------------------------------------------------------------


async def submit_chain(fe: Frontend, descs: list[tuple[int, int, int, int]], head: int = 0):
    for i, d in enumerate(descs):
        fe.ring.write_desc(head + i, *d)
    fe.ram.write(fe.resp_gpa, b"\xff" * 16)
    fe.ring.publish(head)
    fe.kick()
    with trio.fail_after(5):
        return await fe.wait_used()


GAP = 0xA0000  # between the two RAM regions: not guest memory


@pytest.mark.parametrize(
    "make_chain, reason",
    [
        (lambda fe: [(fe.req_gpa, 24, DESC_F_NEXT, 1), (fe.req_gpa, 24, DESC_F_NEXT, 0)],
         "chain longer than the queue size"),
        (lambda fe: [(fe.req_gpa, 24, DESC_F_NEXT, 64)], "links to 64 >= queue size"),
        (lambda fe: [(GAP, 24, DESC_F_NEXT, 1), (fe.resp_gpa, 10, DESC_F_WRITE, 0)],
         "not inside one shared region"),
        (lambda fe: [(fe.req_gpa, 24, DESC_F_NEXT, 1), (GAP - 4, 10, DESC_F_WRITE, 0)],
         "not inside one shared region"),
        (lambda fe: [(fe.req_gpa, 0xFFFF_FFFF, DESC_F_NEXT, 1), (fe.resp_gpa, 10, DESC_F_WRITE, 0)],
         "not inside one shared region"),
        (lambda fe: [(2**64 - 8, 24, DESC_F_NEXT, 1), (fe.resp_gpa, 10, DESC_F_WRITE, 0)],
         "not inside one shared region"),
        (lambda fe: [(fe.req_gpa, 16, DESC_F_INDIRECT, 0)], "indirect descriptor"),
        (lambda fe: [(fe.resp_gpa, 10, DESC_F_WRITE | DESC_F_NEXT, 1), (fe.req_gpa, 24, 0, 0)],
         "readable descriptor 1 after a writable one"),
    ],
)
async def test_hostile_chains_are_returned_unused(attached, caplog, make_chain, reason):
    service, fe = attached
    service.resize(256 * MiB)
    fe.ram.write(fe.req_gpa, MemRequest(RequestType.PLUG, A, 1).pack())
    gap_before = fe.ram.ram[GAP - 4096 : GAP]  # the last page before the gap
    used = await submit_chain(fe, make_chain(fe))
    assert used == (0, 0)
    assert reason in caplog.text
    assert fe.ram.read(fe.resp_gpa, 16) == b"\xff" * 16
    assert fe.ram.ram[GAP - 4096 : GAP] == gap_before
    assert service.device.plugged_size == 0
    fe.ring.next_desc = 2
    assert await fe.plug(A, 1) == ResponseType.ACK  # the ring keeps working


async def test_split_request_and_response_descriptors_work(attached):
    """Legal but unusual: the request spread over 3 buffers, the response over 2."""
    service, fe = attached
    service.resize(256 * MiB)
    raw = MemRequest(RequestType.PLUG, A, 2).pack()
    base = fe.ram.alloc(64, 8)
    fe.ram.write(base, raw[:5])
    fe.ram.write(base + 16, raw[5:20])
    fe.ram.write(base + 40, raw[20:])
    resp = fe.ram.alloc(16, 8)
    fe.ram.write(resp, b"\xff" * 16)
    chain = [
        (base, 5, DESC_F_NEXT, 1),
        (base + 16, 15, DESC_F_NEXT, 2),
        (base + 40, 4, DESC_F_NEXT, 3),
        (resp, 3, DESC_F_WRITE | DESC_F_NEXT, 4),
        (resp + 8, 8, DESC_F_WRITE, 0),
    ]
    assert await submit_chain(fe, chain) == (0, 10)
    written = fe.ram.read(resp, 3) + fe.ram.read(resp + 8, 7)
    assert struct.unpack("<H6xH", written) == (ResponseType.ACK, 0)
    assert service.device.plugged_size == 2 * B


@pytest.mark.parametrize("breakage", ["avail index jump", "head out of range"])
async def test_broken_ring_stops_until_restart(attached, caplog, breakage):
    service, fe = attached
    service.resize(256 * MiB)
    if breakage == "avail index jump":
        fe.ring.publish(0, advance=65)  # 65 new entries on a 64-entry ring
        reason = "more than the queue size 64"
    else:
        fe.ring.publish(64)  # head index == num
        reason = "names head 64 >= queue size 64"
    fe.kick()
    with trio.fail_after(5):
        while reason not in caplog.text:
            await trio.sleep(0.01)
    assert fe.ring.used_idx() == 0
    assert (await fe.get_config()).requested_size == 256 * MiB  # config still answered
    # QEMU's recovery path: stop the ring, reset the driver's ring, start again.
    await fe.stop()
    fe.ring.avail_idx = fe.ring.used_seen = fe.ring.next_desc = 0
    fe.ram.write(fe.ring.avail, bytes(4))
    fe.ram.write(fe.ring.used, bytes(4))
    await fe.start()
    assert await fe.plug(A, 1) == ResponseType.ACK


async def test_ring_outside_shared_memory_is_refused(daemon, caplog):
    service, path = daemon
    fe = Frontend(path)
    await fe.realize()
    await fe.call(Request.SET_FEATURES, vu.encode_u64(vu.VIRTIO_F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES))
    await fe.send_memory()
    await fe.call(Request.SET_VRING_NUM, vu.encode_vring_state(0, 64))
    bad = vu.VringAddr(0, 0, 0x1234_0000, 0x1234_1000, 0x1234_2000, 0)
    await fe.call(Request.SET_VRING_ADDR, vu.encode_vring_addr(bad))
    # The daemon still answers on this connection (and has handled the message).
    assert (await fe.get_config()).block_size == B
    assert "ring 0 is not in shared memory" in caplog.text
    await fe.close()
    fe.release()


async def test_a_full_pipe_posing_as_call_eventfd_does_not_block_the_daemon(attached, caplog):
    service, fe = attached
    service.resize(256 * MiB)
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass  # the pipe is full: a blocking write would hang forever
    await fe.call_ack(Request.SET_VRING_CALL, vu.encode_u64(0), [w])
    fe.ram.write(fe.req_gpa, MemRequest(RequestType.PLUG, A, 1).pack())
    fe.ring.write_desc(0, fe.req_gpa, 24, DESC_F_NEXT, 1)
    fe.ring.write_desc(1, fe.resp_gpa, 10, DESC_F_WRITE, 0)
    fe.ring.publish(0)
    fe.kick()
    with trio.fail_after(5):
        while (used := fe.ring.pop_used()) is None:
            await trio.sleep(0.01)
        assert used == (0, 10)
        assert (await fe.get_config()).plugged_size == B
    assert "cannot signal the call eventfd" in caplog.text
    os.close(r)
    os.close(w)
