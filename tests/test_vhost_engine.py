"""The generic vhost-user engine with no socket and no daemon: messages in,
replies and effects out, driving the test-only echo device.

Guest RAM is real (memfds, as QEMU shares it); the driver's ring is the
testing toolkit's ``Ring``; everything else is plain function calls.
"""

from __future__ import annotations

import os

import pytest

from vmemdev.errors import PeerError
from vmemdev.host.memory import GuestMemory
from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.vhost_user import Flags, ProtocolFeature, Request
from vmemdev.protocol.virtqueue import DESC_F_NEXT, DESC_F_WRITE
from vmemdev.testing.frontend import GuestRam, Ring
from vmemdev.vhost import engine as engine_module
from vmemdev.vhost.engine import (
    MAX_MEM_SLOTS,
    OFFERED_PROTOCOL_FEATURES,
    TRANSPORT_FEATURES,
    BackendChannel,
    Engine,
    RingFd,
    Serve,
)
from vmemdev.vhost.rings import TRANSITIONS, RingEvent, RingState

from .echo_device import CONFIG, ECHO_FEATURE_LOUD, MAGIC, EchoDevice

MiB = 1 << 20
ALL_PROTOCOL = int(OFFERED_PROTOCOL_FEATURES)


def msg(request: int, payload: bytes = b"", fds: tuple[int, ...] = (), need_reply: bool = False) -> vu.Message:
    flags = Flags.VERSION | (Flags.NEED_REPLY if need_reply else 0)
    return vu.decode(request, int(flags), payload, fds)


class Lab:
    """An engine, its echo device, and a guest's RAM and ring."""

    def __init__(self, protocol_features: int = ALL_PROTOCOL, features: int | None = None):
        self.device = EchoDevice()
        self.engine = Engine(self.device, GuestMemory(MAX_MEM_SLOTS))
        self.ram = GuestRam(16 * MiB, 1 << 32, 2 * MiB, dimm=False)
        self.ring = Ring(self.ram, 8)
        self.req = self.ram.alloc(64, 8)
        self.resp = self.ram.alloc(64, 8)
        self.handle(Request.SET_OWNER)
        if protocol_features:
            self.handle(Request.SET_FEATURES, vu.encode_u64(TRANSPORT_FEATURES if features is None else features))
            self.handle(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(protocol_features))
        else:
            self.handle(Request.SET_FEATURES, vu.encode_u64(vu.VIRTIO_F_VERSION_1 if features is None else features))
        regions = [r.describe() for r in self.ram.regions]
        fds = tuple(os.dup(r.fd) for r in self.ram.regions)
        self.handle(Request.SET_MEM_TABLE, vu.encode_mem_table(regions), fds)

    def handle(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), need_reply: bool = False):
        return self.engine.handle(msg(request, payload, fds, need_reply))

    def configure_ring(self) -> None:
        r = self.ring
        self.handle(Request.SET_VRING_NUM, vu.encode_vring_state(0, r.num))
        self.handle(Request.SET_VRING_BASE, vu.encode_vring_state(0, 0))
        addr = vu.VringAddr(0, 0, self.ram.uaddr(r.desc), self.ram.uaddr(r.used), self.ram.uaddr(r.avail), 0)
        self.handle(Request.SET_VRING_ADDR, vu.encode_vring_addr(addr))

    def start(self) -> None:
        self.configure_ring()
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        out = self.handle(Request.SET_VRING_KICK, vu.encode_u64(0), (kick,))
        assert out.effects[0] == RingFd("kick", 0, kick)
        os.close(kick)  # the daemon would own it; here nobody waits on it
        self.handle(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 1))

    def post(self, data: bytes, head: int = 0) -> None:
        self.ram.write(self.req, data)
        self.ring.write_desc(head, self.req, len(data), DESC_F_NEXT, head + 1)
        self.ring.write_desc(head + 1, self.resp, 32, DESC_F_WRITE, 0)
        self.ring.publish(head)

    def serve_all(self) -> int:
        served = 0
        while (request := self.engine.take(0, self.device.max_request)) is not None:
            response = self.device.serve(request.data, request.writable) if request.chain else b""
            self.engine.complete(request, response)
            served += 1
        return served

    def close(self) -> None:
        self.engine.close()
        self.ram.close()


@pytest.fixture
def lab():
    lab = Lab()
    yield lab
    lab.close()


def test_every_decoded_request_has_a_handler():
    assert set(engine_module.HANDLERS) == set(vu._LAYOUTS)


def test_features_are_the_transport_and_the_device_bits():
    engine = Engine(EchoDevice(), GuestMemory(MAX_MEM_SLOTS))
    reply = engine.handle(msg(Request.GET_FEATURES)).reply
    assert vu.U64.unpack(reply)[0] == TRANSPORT_FEATURES | ECHO_FEATURE_LOUD
    with pytest.raises(PeerError, match="not offered"):
        engine.handle(msg(Request.SET_FEATURES, vu.encode_u64(1 << 40)))
    with pytest.raises(PeerError, match="not offered"):
        engine.handle(msg(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(1 << 40)))
    engine.handle(msg(Request.SET_FEATURES, vu.encode_u64(TRANSPORT_FEATURES | ECHO_FEATURE_LOUD)))
    assert engine.device.accepted_features == ECHO_FEATURE_LOUD  # the device sees its own bits only


def test_gated_requests_need_their_protocol_feature():
    engine = Engine(EchoDevice(), GuestMemory(MAX_MEM_SLOTS))
    with pytest.raises(PeerError, match="CONFIG was not negotiated"):
        engine.handle(msg(Request.GET_CONFIG, vu.encode_config(0, bytes(8))))
    engine.handle(msg(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(ProtocolFeature.CONFIG)))
    reply = engine.handle(msg(Request.GET_CONFIG, vu.encode_config(0, bytes(8)))).reply
    assert CONFIG.unpack(reply[12:]) == (0, MAGIC)


def test_config_outside_the_device_is_an_empty_reply(lab):
    reply = lab.handle(Request.GET_CONFIG, vu.encode_config(4, bytes(8))).reply
    assert vu.CONFIG_HEADER.unpack_from(reply) == (4, 0, 0) and len(reply) == 12
    with pytest.raises(PeerError, match="read-only"):
        lab.handle(Request.SET_CONFIG, vu.encode_config(0, bytes(8)))


def test_reply_ack_answers_need_reply(lab):
    assert lab.handle(Request.SET_VRING_NUM, vu.encode_vring_state(0, 8), need_reply=True).reply == vu.encode_u64(0)


def test_fds_are_handed_over_as_effects(lab):
    call, err = os.eventfd(0), os.eventfd(0)
    out = lab.handle(Request.SET_VRING_CALL, vu.encode_u64(0), (call,))
    assert out.effects == (RingFd("call", 0, call),) and out.kept_fds == {call}
    out = lab.handle(Request.SET_VRING_ERR, vu.encode_u64(0), (err,))
    assert out.effects == (RingFd("err", 0, err),) and out.kept_fds == {err}
    out = lab.handle(Request.SET_VRING_KICK, vu.encode_u64(vu.VRING_NOFD_MASK))  # polling: no fd
    assert RingFd("kick", 0, None) in out.effects and out.kept_fds == frozenset()
    a, b = os.pipe()
    out = lab.handle(Request.SET_BACKEND_REQ_FD, b"", (a,))
    assert out.effects == (BackendChannel(a),) and out.kept_fds == {a}
    for fd in (call, err, a, b):
        os.close(fd)


def test_memory_table_keeps_its_fds_and_remaps_the_rings(lab):
    lab.start()
    regions = [r.describe() for r in lab.ram.regions]
    fds = tuple(os.dup(r.fd) for r in lab.ram.regions)
    out = lab.handle(Request.SET_MEM_TABLE, vu.encode_mem_table(regions), fds)
    assert out.kept_fds == set(fds) and Serve(0) in out.effects
    lab.post(b"hello")
    assert lab.serve_all() == 1  # the ring works through the new mapping
    assert lab.ram.read(lab.resp, 5) == b"olleh"


def test_ring_lifecycle_follows_the_state_table(lab):
    ring = lab.engine.rings[0]
    lab.configure_ring()
    assert ring.state is RingState.STOPPED
    lab.post(b"early")
    assert lab.serve_all() == 0  # not started: nothing is taken
    kick = os.eventfd(0)
    lab.handle(Request.SET_VRING_KICK, vu.encode_u64(0), (kick,))
    assert ring.state is RingState.STARTED and lab.serve_all() == 0
    lab.handle(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 1))
    assert ring.state is RingState.RUNNING and lab.device.enabled_calls == 1
    assert lab.serve_all() == 1 and lab.ram.read(lab.resp, 5) == b"ylrae"
    lab.handle(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 0))
    assert ring.state is RingState.STARTED
    lab.handle(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 1))
    reply = lab.handle(Request.GET_VRING_BASE, vu.encode_vring_state(0, 0))
    assert vu.VRING_STATE.unpack(reply.reply) == (0, 1) and RingFd("kick", 0, None) in reply.effects
    assert ring.state is RingState.STOPPED_ENABLED
    out = lab.handle(Request.RESET_OWNER)
    assert ring.state is RingState.STOPPED and ring.num == 0
    assert {e.kind for e in out.effects if isinstance(e, RingFd) and e.fd is None} == {"kick", "call", "err"}
    os.close(kick)


def test_without_protocol_features_a_started_ring_runs():
    lab = Lab(protocol_features=0)
    try:
        lab.configure_ring()
        out = lab.handle(Request.SET_VRING_KICK, vu.encode_u64(vu.VRING_NOFD_MASK))
        assert lab.engine.rings[0].state is RingState.RUNNING and Serve(0) in out.effects
    finally:
        lab.close()


def test_a_broken_ring_stays_idle_until_stopped_and_restarted(lab):
    lab.start()
    ring = lab.engine.rings[0]
    lab.ring.publish(0, advance=9)  # 9 entries on an 8-entry ring
    assert lab.engine.take(0, 24) is None and ring.state is RingState.BROKEN
    lab.handle(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 1))
    assert ring.state is RingState.BROKEN  # enabling again does not revive it
    lab.handle(Request.GET_VRING_BASE, vu.encode_vring_state(0, 0))
    assert ring.state is RingState.STOPPED
    lab.ram.write(lab.ring.avail, bytes(4))
    lab.ring.avail_idx = 0
    lab.start()
    lab.post(b"again")
    assert lab.serve_all() == 1


def test_a_malformed_chain_is_returned_unused(lab):
    lab.start()
    lab.ram.write(lab.req, b"abc")
    lab.ring.write_desc(0, lab.resp, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
    lab.ring.write_desc(1, lab.req, 3, 0, 0)  # readable after writable
    lab.ring.publish(0)
    request = lab.engine.take(0, 24)
    assert request is not None and request.chain is None
    lab.engine.complete(request, b"")
    assert lab.ring.pop_used() == (0, 0) and lab.device.served == 0


def test_every_state_and_event_has_a_defined_outcome():
    # RESET reaches STOPPED from anywhere; STOP never leaves a ring running.
    for state in RingState:
        assert TRANSITIONS[(state, RingEvent.RESET)] is RingState.STOPPED
        assert TRANSITIONS.get((state, RingEvent.STOP), state) is not RingState.RUNNING


def test_a_misaligned_ring_is_refused(lab):
    """A used.idx that is not 2-byte aligned cannot be published with one store."""
    r = lab.ring
    lab.handle(Request.SET_VRING_NUM, vu.encode_vring_state(0, r.num))
    addr = vu.VringAddr(0, 0, lab.ram.uaddr(r.desc), lab.ram.uaddr(r.used) + 2, lab.ram.uaddr(r.avail), 0)
    with pytest.raises(PeerError, match="used ring at 0x[0-9a-f]+ is not 4-byte aligned"):
        lab.handle(Request.SET_VRING_ADDR, vu.encode_vring_addr(addr))
