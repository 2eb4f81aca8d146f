"""A generic vhost-user back-end, sans-IO: one decoded message in, an outcome out.

The engine keeps what one front-end connection negotiated: features, the
memory table (through a ``GuestMemory`` it is given), the rings and their
lifecycle. It knows nothing of virtio-mem: config space and features come
from a ``Device``. It never touches a socket or an fd it did not map: the
fds a message brings are handed back as ``effects`` (watch this kick fd,
signal through this call fd, take this backend channel) for the daemon, who
owns them. Ring requests leave through ``take`` and return through
``complete``; what a request means is the device's business.

The engine is not thread-safe, and a message that changes what a request
uses (memory table, ring configuration, ring stop, resets) must not arrive
between ``take`` and ``complete``: the daemon calls it from one thread that
answers a request before it reads the next message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import GuestMemoryError, PeerError
from ..protocol import vhost_user as vu
from ..protocol.vhost_user import Message, ProtocolFeature, Request
from ..protocol.virtqueue import Chain, ChainError, RingBroken, valid_queue_size
from .interfaces import Device, GuestMemory
from .rings import Ring, RingEvent

log = logging.getLogger(__name__)

MAX_MEM_SLOTS = 509  # what GET_MAX_MEM_SLOTS answers; memory hotplug setups need this many

TRANSPORT_FEATURES = vu.VIRTIO_F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES
# int, not IntFlag: ~IntFlag only inverts the bits the enum defines.
OFFERED_PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)

# Requests that are only valid once a protocol feature was negotiated.
GATED: dict[int, ProtocolFeature] = {
    Request.GET_QUEUE_NUM: ProtocolFeature.MQ,
    Request.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
    Request.GET_CONFIG: ProtocolFeature.CONFIG,
    Request.SET_CONFIG: ProtocolFeature.CONFIG,
    Request.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.SET_STATUS: ProtocolFeature.STATUS,
    Request.GET_STATUS: ProtocolFeature.STATUS,
    Request.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
}

# --- effects: what the daemon must do with the fds a message brought ---------


@dataclass(frozen=True, slots=True)
class RingFd:
    """Ring ``index``'s kick, call or err fd is now ``fd`` (None: none).

    The daemon stops using and closes the one it had for that role.
    """

    kind: str  # "kick", "call", "err"
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class BackendChannel:
    """The socket for back-end requests (SET_BACKEND_REQ_FD)."""

    fd: int


@dataclass(frozen=True, slots=True)
class Serve:
    """Ring ``index`` may have requests waiting (enabled, started, remapped)."""

    index: int


Effect = RingFd | BackendChannel | Serve


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: bytes | None  # payload of the reply, None for no reply
    kept_fds: frozenset[int]  # fds of the message someone now owns; close the rest
    effects: tuple[Effect, ...]


NOTHING: frozenset[int] = frozenset()
_Body = TypeVar("_Body")


def _body(msg: Message, kind: type[_Body]) -> _Body:
    """The decoded payload, typed (vu.decode gives each request its one type)."""
    body = msg.body
    if not isinstance(body, kind):
        raise PeerError(f"{msg.name}: payload of an unexpected type")
    return body


@dataclass(slots=True)
class RingRequest:
    """One descriptor chain taken from a ring, waiting for its response."""

    ring: int
    head: int
    data: bytes  # the readable buffers, gathered (at most the device's max_request)
    writable: int  # total length of the writable buffers
    chain: Chain | None  # None: malformed (logged); complete it with b"" (returned unused)


class Engine:
    def __init__(self, device: Device, memory: GuestMemory):
        self.device = device
        self.memory = memory
        self.offered_features = TRANSPORT_FEATURES | device.features
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.rings = [Ring(i) for i in range(device.num_queues)]
        self._kept: set[int] = set()
        self._effects: list[Effect] = []
        self._redelivered = False

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    def handle(self, msg: Message, *, redelivered: bool = False) -> Outcome:
        """Apply one message. Raises PeerError when it breaks the protocol.

        ``redelivered``: a process that died may have applied it already (a
        successor handles the message it was applying again). Every message
        that changes state gives the same state and reply applied once or
        twice, except REM_MEM_REG, whose region is then already gone.

        Whatever happens, the caller closes the message's fds that are not in
        the outcome's ``kept_fds`` (on PeerError: all of them).
        """
        self._kept = set()
        self._effects = []
        self._redelivered = redelivered
        feature = GATED.get(msg.request)
        if feature is not None and not self.protocol_features & feature:
            raise PeerError(f"{msg.name} sent but {feature.name} was not negotiated")
        reply = HANDLERS[msg.request](self, msg)
        if reply is None and msg.need_reply and self.reply_ack:
            reply = vu.encode_u64(0)
        if not self._kept and not self._effects:
            return Outcome(reply, NOTHING, ())
        return Outcome(reply, frozenset(self._kept), tuple(self._effects))

    def _ring(self, index: int) -> Ring:
        if not 0 <= index < len(self.rings):
            raise PeerError(f"ring index {index} out of range (device has {len(self.rings)})")
        return self.rings[index]

    def _keep(self, fd: int | None) -> None:
        if fd is not None:
            self._kept.add(fd)

    # --- features, ownership, status --------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return vu.encode_u64(self.offered_features)

    def _set_features(self, msg: Message) -> None:
        self.features = self._accept(msg, self.offered_features)
        self.device.set_features(self.features & self.device.features)
        if not self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            for ring in self.rings:  # without it, rings are enabled as they start
                ring.apply(RingEvent.ENABLE)
                self._effects.append(Serve(ring.index))

    def _get_protocol_features(self, msg: Message) -> bytes:
        return vu.encode_u64(OFFERED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        self.protocol_features = self._accept(msg, OFFERED_PROTOCOL_FEATURES)

    @staticmethod
    def _accept(msg: Message, offered: int) -> int:
        value = _body(msg, int)
        if value & ~int(offered):
            raise PeerError(f"{msg.name} {value:#x} has bits that were not offered")
        return value

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset(self, msg: Message) -> None:
        log.info("%s: rings reset; the device keeps its state", msg.name)
        for ring in self.rings:
            ring.reset()
            for kind in ("kick", "call", "err"):
                self._effects.append(RingFd(kind, ring.index, None))

    def _get_queue_num(self, msg: Message) -> bytes:
        return vu.encode_u64(len(self.rings))

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return vu.encode_u64(MAX_MEM_SLOTS)

    def _set_status(self, msg: Message) -> None:
        self.status = _body(msg, int) & 0xFF
        if self.status == 0:
            log.info("device reset by the driver: the device keeps its state")

    def _get_status(self, msg: Message) -> bytes:
        return vu.encode_u64(self.status)

    # --- config space -------------------------------------------------------------

    def _get_config(self, msg: Message) -> bytes:
        cfg = _body(msg, vu.ConfigSpace)
        data = self.device.read_config(cfg.offset, cfg.size)
        if data is None:
            log.error("GET_CONFIG offset %d size %d is outside the config space; "
                      "answering an empty reply", cfg.offset, cfg.size)
            data = b""
        return vu.encode_config(cfg.offset, data, cfg.flags)

    def _set_config(self, msg: Message) -> None:
        cfg = _body(msg, vu.ConfigSpace)
        self.device.write_config(cfg.offset, cfg.data)

    def _set_backend_req_fd(self, msg: Message) -> None:
        self._effects.append(BackendChannel(msg.fds[0]))
        self._keep(msg.fds[0])

    # --- memory ---------------------------------------------------------------------

    def _change_memory(self, change: Callable[[], None]) -> None:
        for ring in self.rings:
            ring.unmap()
        try:
            change()
        finally:
            for ring in self.rings:
                ring.map(self.memory)
                self._effects.append(Serve(ring.index))

    def _set_mem_table(self, msg: Message) -> None:
        table = _body(msg, vu.MemTable)

        def replace() -> None:
            self._kept |= self.memory.replace_all(table.regions, msg.fds)

        self._change_memory(replace)
        log.info("memory table: %s", self.memory.describe())

    def _add_mem_reg(self, msg: Message) -> None:
        def add() -> None:
            if self.memory.add(_body(msg, vu.MemoryRegion), msg.fds[0]):
                self._keep(msg.fds[0])

        self._change_memory(add)
        log.info("memory region added: %s", msg.body)

    def _rem_mem_reg(self, msg: Message) -> None:
        region = _body(msg, vu.MemoryRegion)
        if self._redelivered and not any((d.guest_phys_addr, d.memory_size, d.userspace_addr) == (
                region.guest_phys_addr, region.memory_size, region.userspace_addr) for d in self.memory.table()):
            log.info("memory region %s removed before the restart", region)
            return
        self._change_memory(lambda: self.memory.remove(region))
        log.info("memory region removed: %s", msg.body)

    # --- rings ----------------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        state = _body(msg, vu.VringState)
        ring = self._ring(state.index)
        if not valid_queue_size(state.num):
            raise PeerError(f"SET_VRING_NUM {state.num} is not a power of two in 1..32768")
        ring.unmap()
        ring.num = state.num
        ring.map(self.memory)

    def _set_vring_addr(self, msg: Message) -> None:
        addr = _body(msg, vu.VringAddr)
        ring = self._ring(addr.index)
        ring.unmap()
        ring.addr = addr
        problem = ring.map(self.memory)
        if isinstance(problem, GuestMemoryError):
            raise PeerError(f"SET_VRING_ADDR: ring {addr.index} is not in shared memory") from problem
        if problem is not None:
            raise PeerError(f"SET_VRING_ADDR: ring {addr.index}: {problem}") from problem

    def _set_vring_base(self, msg: Message) -> None:
        state = _body(msg, vu.VringState)
        ring = self._ring(state.index)
        if state.num > 0xFFFF:
            raise PeerError(f"SET_VRING_BASE {state.num} does not fit a split ring index")
        ring.unmap()
        ring.last_avail_idx = state.num
        ring.broken_reason = None
        ring.map(self.memory)

    def _get_vring_base(self, msg: Message) -> bytes:
        state = _body(msg, vu.VringState)
        ring = self._ring(state.index)
        ring.apply(RingEvent.STOP)
        self._effects.append(RingFd("kick", ring.index, None))
        if ring.queue is not None:
            ring.last_avail_idx = ring.queue.last_avail_idx
        log.info("vring %d stopped at avail index %d", ring.index, ring.last_avail_idx)
        return vu.encode_vring_state(ring.index, ring.last_avail_idx)

    def _ring_fd(self, kind: str, msg: Message) -> Ring:
        file = _body(msg, vu.VringFile)
        ring = self._ring(file.index)
        self._effects.append(RingFd(kind, ring.index, file.fd))
        self._keep(file.fd)
        return ring

    def _set_vring_kick(self, msg: Message) -> None:
        ring = self._ring_fd("kick", msg)
        if _body(msg, vu.VringFile).fd is None:
            log.warning("vring %d: no kick fd (polling) is not supported; ring idle", ring.index)
        ring.apply(RingEvent.KICK)
        if not self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            ring.apply(RingEvent.ENABLE)
        self._effects.append(Serve(ring.index))  # buffers made available before the kick fd

    def _set_vring_call(self, msg: Message) -> None:
        self._ring_fd("call", msg)

    def _set_vring_err(self, msg: Message) -> None:
        self._ring_fd("err", msg)

    def _set_vring_enable(self, msg: Message) -> None:
        state = _body(msg, vu.VringState)
        ring = self._ring(state.index)
        if state.num not in (0, 1):
            raise PeerError(f"SET_VRING_ENABLE value {state.num} is not 0 or 1")
        ring.apply(RingEvent.ENABLE if state.num else RingEvent.DISABLE)
        if state.num:
            self.device.rings_enabled()
            self._effects.append(Serve(ring.index))  # a kick before the enable is not lost

    # --- ring requests --------------------------------------------------------------

    def take(self, index: int, max_request: int) -> RingRequest | None:
        """The next chain of a running ring, or None when there is none.

        A malformed chain comes back with ``chain=None`` (logged); an
        inconsistent ring is stopped until QEMU restarts it.
        """
        ring = self.rings[index]
        queue = ring.queue
        if queue is None or not ring.ready:
            return None
        try:
            head = queue.pop_head()
        except RingBroken as exc:
            ring.apply(RingEvent.BREAK)
            ring.broken_reason = str(exc)
            log.error("vring %d is broken, stopping it until restarted: %s", index, exc)
            return None
        if head is None:
            return None
        try:
            chain = queue.read_chain(head, self.memory.check_gpa)
        except ChainError as exc:
            log.error("guest driver bug: %s; returned unused", exc)
            return RingRequest(index, head, b"", 0, None)
        return RingRequest(index, head, self._gather(chain, max_request),
                           sum(buf.length for buf in chain.writable), chain)

    def _gather(self, chain: Chain, limit: int) -> bytes:
        data = b""
        for buf in chain.readable:
            take = min(buf.length, limit - len(data))
            data += self.memory.read(buf.addr, take)
            if len(data) == limit:
                break
        return data

    def complete(self, request: RingRequest, response: bytes) -> None:
        """Scatter the response over the writable buffers and publish the used entry.

        An empty response returns the chain unused. The caller signals the
        ring's call fd afterwards.
        """
        pos = 0
        for buf in request.chain.writable if request.chain else ():
            if pos == len(response):
                break
            take = min(buf.length, len(response) - pos)
            self.memory.write(buf.addr, response[pos : pos + take])
            pos += take
        queue = self.rings[request.ring].queue
        if queue is not None:
            queue.push_used(request.head, pos)

    def close(self) -> None:
        for ring in self.rings:
            ring.unmap()
        self.memory.close()


def _table() -> dict[int, Callable[[Engine, Message], bytes | None]]:
    E = Engine
    return {
        Request.GET_FEATURES: E._get_features,
        Request.SET_FEATURES: E._set_features,
        Request.GET_PROTOCOL_FEATURES: E._get_protocol_features,
        Request.SET_PROTOCOL_FEATURES: E._set_protocol_features,
        Request.SET_OWNER: E._set_owner,
        Request.RESET_OWNER: E._reset,
        Request.RESET_DEVICE: E._reset,
        Request.GET_QUEUE_NUM: E._get_queue_num,
        Request.GET_MAX_MEM_SLOTS: E._get_max_mem_slots,
        Request.SET_STATUS: E._set_status,
        Request.GET_STATUS: E._get_status,
        Request.GET_CONFIG: E._get_config,
        Request.SET_CONFIG: E._set_config,
        Request.SET_BACKEND_REQ_FD: E._set_backend_req_fd,
        Request.SET_MEM_TABLE: E._set_mem_table,
        Request.ADD_MEM_REG: E._add_mem_reg,
        Request.REM_MEM_REG: E._rem_mem_reg,
        Request.SET_VRING_NUM: E._set_vring_num,
        Request.SET_VRING_ADDR: E._set_vring_addr,
        Request.SET_VRING_BASE: E._set_vring_base,
        Request.GET_VRING_BASE: E._get_vring_base,
        Request.SET_VRING_KICK: E._set_vring_kick,
        Request.SET_VRING_CALL: E._set_vring_call,
        Request.SET_VRING_ERR: E._set_vring_err,
        Request.SET_VRING_ENABLE: E._set_vring_enable,
    }


# Every request vu.decode accepts has a handler here (checked by a test).
HANDLERS = _table()
