"""One vhost-user session: front-end messages become state and actions.

A ``BackendSession`` lives as long as one front-end connection. It keeps
the negotiated features, the guest memory and the rings, answers messages,
and runs the virtqueue: a kick watcher per ring wakes a worker that hands
each request to the ``DeviceService``. It does no socket I/O of its own:
replies are returned to the caller, config notifications go through the
``send_backend_message`` callback.
"""

from __future__ import annotations

import logging
import os

import trio

from ..errors import PeerProtocolError
from ..host.memory import MAX_MEM_SLOTS
from ..host.memory import GuestMemory
from ..protocol import vhost_user as vu
from ..protocol import virtio_mem as vm
from ..protocol.vhost_user import Message, ProtocolFeature, Request
from ..protocol.virtqueue import Chain, ChainError, RingBroken, valid_queue_size
from .service import DeviceService
from .vring import Vring
from .vring import close_fd

log = logging.getLogger(__name__)

NUM_QUEUES = 1  # virtio-mem has one virtqueue, "guest-request"

OFFERED_FEATURES = (
    vu.VIRTIO_F_VERSION_1
    | vu.VHOST_USER_F_PROTOCOL_FEATURES
    | vm.Feature.ACPI_PXM
    | vm.Feature.UNPLUGGED_INACCESSIBLE
)
OFFERED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)

# Requests that are only valid once a protocol feature was negotiated.
GATED = {
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


def _nonblocking(file: vu.VringFile) -> vu.VringFile:
    """A peer's fd must never block the daemon (a full pipe posing as an eventfd)."""
    if file.fd is not None:
        try:
            os.set_blocking(file.fd, False)
        except OSError as exc:
            raise PeerProtocolError(f"ring {file.index}: unusable fd ({exc})") from exc
    return file


class BackendSession:
    def __init__(self, service: DeviceService, nursery: trio.Nursery):
        self.service = service
        self.nursery = nursery
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.memory = GuestMemory()
        self.vrings = [Vring(i) for i in range(NUM_QUEUES)]
        self.on_backend_fd = None  # callback(fd) taking ownership, set by the connection
        service.memory = self.memory
        self.kept_fds: set[int] = set()  # fds of the current message that a handler kept
        for vring in self.vrings:
            nursery.start_soon(self._ring_worker, vring)

    # --- dispatch ------------------------------------------------------------

    def _check_gate(self, msg: Message) -> None:
        feature = GATED.get(msg.request)
        if feature is not None and not self.protocol_features & feature:
            raise PeerProtocolError(f"{msg.name} sent but {feature.name} was not negotiated")

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < NUM_QUEUES:
            raise PeerProtocolError(f"ring index {index} out of range (device has {NUM_QUEUES})")
        return self.vrings[index]

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    async def handle(self, msg: Message) -> bytes | None:
        """Apply one message; returns the reply payload, or None for no reply.

        Raises PeerProtocolError for a message that breaks the protocol; the
        caller logs it and answers a failure where the front-end waits for one.
        Either way the caller closes the message's fds not in ``kept_fds``.
        """
        self.kept_fds = set()
        self._check_gate(msg)
        handler = getattr(self, "_on_" + Request(msg.request).name.lower())
        reply = await handler(msg)
        if reply is None and msg.need_reply and self.reply_ack:
            reply = vu.encode_u64(0)
        return reply

    # --- features and ownership ---------------------------------------------

    async def _on_get_features(self, msg: Message) -> bytes:
        return vu.encode_u64(OFFERED_FEATURES)

    async def _on_set_features(self, msg: Message) -> None:
        value = msg.body
        if value & ~OFFERED_FEATURES:
            raise PeerProtocolError(f"SET_FEATURES {value:#x} has bits that were not offered")
        self.features = value
        if not value & vm.Feature.UNPLUGGED_INACCESSIBLE:
            log.warning(
                "driver did not accept UNPLUGGED_INACCESSIBLE: it may read unplugged memory"
            )
        if not value & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            for vring in self.vrings:  # without it, rings are enabled as they start
                vring.enabled = True
                vring.poke()

    async def _on_get_protocol_features(self, msg: Message) -> bytes:
        return vu.encode_u64(OFFERED_PROTOCOL_FEATURES)

    async def _on_set_protocol_features(self, msg: Message) -> None:
        value = msg.body
        if value & ~OFFERED_PROTOCOL_FEATURES:
            raise PeerProtocolError(f"SET_PROTOCOL_FEATURES {value:#x} has bits that were not offered")
        self.protocol_features = value

    async def _on_set_owner(self, msg: Message) -> None:
        self.owner = True

    async def _on_reset_owner(self, msg: Message) -> None:
        await self._reset_rings("RESET_OWNER")

    async def _on_reset_device(self, msg: Message) -> None:
        await self._reset_rings("RESET_DEVICE")

    async def _reset_rings(self, why: str) -> None:
        log.info("%s: rings reset; plugged blocks and their memory are kept", why)
        async with self.service.request_lock:
            for vring in self.vrings:
                self._stop_kick_watcher(vring)
                vring.reset()

    async def _on_get_queue_num(self, msg: Message) -> bytes:
        return vu.encode_u64(NUM_QUEUES)

    async def _on_get_max_mem_slots(self, msg: Message) -> bytes:
        return vu.encode_u64(MAX_MEM_SLOTS)

    # --- status --------------------------------------------------------------

    async def _on_set_status(self, msg: Message) -> None:
        self.status = msg.body & 0xFF
        if self.status == 0:
            log.info("device reset by the driver: plugged blocks and their memory are kept")

    async def _on_get_status(self, msg: Message) -> bytes:
        return vu.encode_u64(self.status)

    # --- config space --------------------------------------------------------

    async def _on_get_config(self, msg: Message) -> bytes:
        cfg: vu.ConfigSpace = msg.body
        if cfg.offset + cfg.size > vm.CONFIG_SIZE:
            log.error(
                "GET_CONFIG offset %d size %d is outside the %d-byte config space; "
                "answering an empty reply",
                cfg.offset,
                cfg.size,
                vm.CONFIG_SIZE,
            )
            return vu.encode_config(cfg.offset, b"", cfg.flags)
        data = self.service.device.config().pack()[cfg.offset : cfg.offset + cfg.size]
        return vu.encode_config(cfg.offset, data, cfg.flags)

    async def _on_set_config(self, msg: Message) -> None:
        raise PeerProtocolError("SET_CONFIG refused: virtio-mem config space is read-only")

    async def _on_set_backend_req_fd(self, msg: Message) -> None:
        if self.on_backend_fd is not None:
            self.on_backend_fd(msg.fds[0])  # raises without taking it if unusable
            self.kept_fds.add(msg.fds[0])

    # --- memory --------------------------------------------------------------

    async def _change_memory(self, change) -> None:
        async with self.service.request_lock:
            for vring in self.vrings:
                vring.unmap()
            try:
                change()
            finally:
                for vring in self.vrings:
                    vring.map(self.memory)
                    vring.poke()

    async def _on_set_mem_table(self, msg: Message) -> None:
        table: vu.MemTable = msg.body

        def replace():
            self.kept_fds |= self.memory.replace_all(table.regions, msg.fds)

        await self._change_memory(replace)
        log.info("memory table: %s", ", ".join(repr(r) for r in self.memory.regions))

    async def _on_add_mem_reg(self, msg: Message) -> None:
        def add():
            if self.memory.add(msg.body, msg.fds[0]).fd == msg.fds[0]:
                self.kept_fds.add(msg.fds[0])

        await self._change_memory(add)
        log.info("memory region added: %s", msg.body)

    async def _on_rem_mem_reg(self, msg: Message) -> None:
        await self._change_memory(lambda: self.memory.remove(msg.body))
        log.info("memory region removed: %s", msg.body)

    # --- rings ---------------------------------------------------------------

    async def _on_set_vring_num(self, msg: Message) -> None:
        state: vu.VringState = msg.body
        vring = self._vring(state.index)
        if not valid_queue_size(state.num):
            raise PeerProtocolError(f"SET_VRING_NUM {state.num} is not a power of two in 1..32768")
        async with self.service.request_lock:
            vring.unmap()
            vring.num = state.num
            vring.map(self.memory)

    async def _on_set_vring_addr(self, msg: Message) -> None:
        addr: vu.VringAddr = msg.body
        vring = self._vring(addr.index)
        async with self.service.request_lock:
            vring.unmap()
            vring.addr = addr
            vring.map(self.memory)
            if vring.queue is None:
                raise PeerProtocolError(f"SET_VRING_ADDR: ring {addr.index} is not in shared memory")

    async def _on_set_vring_base(self, msg: Message) -> None:
        state: vu.VringState = msg.body
        vring = self._vring(state.index)
        if state.num > 0xFFFF:
            raise PeerProtocolError(f"SET_VRING_BASE {state.num} does not fit a split ring index")
        async with self.service.request_lock:
            vring.unmap()
            vring.last_avail_idx = state.num
            vring.broken = None
            vring.map(self.memory)

    async def _on_get_vring_base(self, msg: Message) -> bytes:
        state: vu.VringState = msg.body
        vring = self._vring(state.index)
        vring.started = False
        # Let an in-flight request finish so the index we return is exact.
        async with self.service.request_lock:
            self._stop_kick_watcher(vring)
            close_fd(vring.kick_fd)
            vring.kick_fd = None
            if vring.queue is not None:
                vring.last_avail_idx = vring.queue.last_avail_idx
        log.info("vring %d stopped at avail index %d", vring.index, vring.last_avail_idx)
        return vu.encode_vring_state(vring.index, vring.last_avail_idx)

    async def _on_set_vring_kick(self, msg: Message) -> None:
        file: vu.VringFile = _nonblocking(msg.body)
        vring = self._vring(file.index)
        self._stop_kick_watcher(vring)
        close_fd(vring.kick_fd)
        vring.kick_fd = file.fd
        self.kept_fds.add(file.fd)
        if file.fd is None:
            log.warning("vring %d: no kick fd (polling) is not supported; ring idle", vring.index)
        else:
            vring.cancel_scope = trio.CancelScope()
            self.nursery.start_soon(self._kick_watcher, vring, file.fd, vring.cancel_scope)
        vring.started = True
        if not self.features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            vring.enabled = True
        vring.poke()  # buffers made available before the kick fd arrived

    async def _on_set_vring_call(self, msg: Message) -> None:
        file: vu.VringFile = _nonblocking(msg.body)
        vring = self._vring(file.index)
        close_fd(vring.call_fd)
        vring.call_fd = file.fd
        self.kept_fds.add(file.fd)

    async def _on_set_vring_err(self, msg: Message) -> None:
        file: vu.VringFile = _nonblocking(msg.body)
        vring = self._vring(file.index)
        close_fd(vring.err_fd)
        vring.err_fd = file.fd
        self.kept_fds.add(file.fd)

    async def _on_set_vring_enable(self, msg: Message) -> None:
        state: vu.VringState = msg.body
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise PeerProtocolError(f"SET_VRING_ENABLE value {state.num} is not 0 or 1")
        vring.enabled = bool(state.num)
        if vring.enabled:
            # The memory table is complete by now: say at once if the region is unshared.
            self.service.check_backing()
            vring.poke()  # a kick that came before the enable must not be lost

    def _stop_kick_watcher(self, vring: Vring) -> None:
        if vring.cancel_scope is not None:
            vring.cancel_scope.cancel()
            vring.cancel_scope = None
        if vring.kick_fd is not None:
            trio.lowlevel.notify_closing(vring.kick_fd)

    async def _kick_watcher(self, vring: Vring, fd: int, scope: trio.CancelScope) -> None:
        lock = self.service.request_lock
        with scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                    os.eventfd_read(fd)
                except (OSError, trio.ClosedResourceError) as exc:
                    log.error("vring %d: kick fd failed (%s); waiting for a new one", vring.index, exc)
                    return
                # Serve the ring from here when nobody holds or waits for the
                # lock: waking the worker task (and the lock's checkpoint) would
                # cost two more passes of the scheduler per request.
                try:
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    vring.poke()
                    continue
                try:
                    await self._drain_locked(vring)
                finally:
                    lock.release()
                if scope.cancel_called:  # replaced or stopped while we served: the fd may be gone
                    return

    async def _ring_worker(self, vring: Vring) -> None:
        while True:
            await vring.wakeup.wait()
            vring.wakeup = trio.Event()
            await self._drain(vring)

    async def _drain(self, vring: Vring) -> None:
        async with self.service.request_lock:
            await self._drain_locked(vring)

    async def _drain_locked(self, vring: Vring) -> None:
        while vring.ready:
            queue = vring.queue
            try:
                head = queue.pop_head()
            except RingBroken as exc:
                vring.broken = str(exc)
                log.error("vring %d is broken, stopping it until restarted: %s", vring.index, exc)
                return
            if head is None:
                return
            # A request runs to its used-ring entry even if we are being
            # cancelled (shutdown): its discard may already have happened. The
            # service shields the host work it awaits; nothing else here is a
            # checkpoint, so no per-request CancelScope (~5 µs) is needed.
            written = await self._serve_head(queue, head)
            queue.push_used(head, written)
            vring.signal_used()

    # --- virtio-mem requests ---------------------------------------------------

    async def _serve_head(self, queue, head: int) -> int:
        """Serve one chain; returns the bytes written to its writable buffers."""
        try:
            chain = queue.read_chain(head, self.memory.check_gpa)
        except ChainError as exc:
            log.error("guest driver bug: %s; returned unused", exc)
            return 0
        request = read_request(self.memory, chain)
        if request is None:
            return 0
        response = await self.service.execute(request)
        log.debug("%s -> %s", request, response)
        return write_response(self.memory, chain, response.pack())

    # --- teardown --------------------------------------------------------------

    def close(self) -> None:
        for vring in self.vrings:
            self._stop_kick_watcher(vring)
            vring.close()
        if self.service.memory is self.memory:
            self.service.memory = None
        self.memory.close()


# --- virtio-mem requests in guest memory (chains are bounds-checked already) --


def read_request(memory: GuestMemory, chain: Chain) -> vm.MemRequest | None:
    """The 24-byte request gathered from the readable buffers, or None (logged)."""
    data = bytearray()
    for buf in chain.readable:
        take = min(buf.length, vm.REQUEST_SIZE - len(data))
        data += memory.read(buf.addr, take)
        if len(data) == vm.REQUEST_SIZE:
            break
    writable = sum(buf.length for buf in chain.writable)
    if len(data) < vm.REQUEST_SIZE:
        problem = f"request is {len(data)} bytes, shorter than {vm.REQUEST_SIZE}"
    elif writable < vm.RESPONSE_SIZE:
        problem = f"writable space is {writable} bytes, shorter than the {vm.RESPONSE_SIZE}-byte response"
    else:
        request = vm.MemRequest.unpack(data)
        if request.type in vm.RequestType._value2member_map_:
            return request
        problem = f"unknown request type {request.type}"
    log.error("guest driver bug at head %d: %s; returned unused, nothing done", chain.head, problem)
    return None


def write_response(memory: GuestMemory, chain: Chain, data: bytes) -> int:
    """Scatter the response over the writable buffers; returns the bytes written."""
    pos = 0
    for buf in chain.writable:
        take = min(buf.length, len(data) - pos)
        memory.write(buf.addr, data[pos : pos + take])
        pos += take
        if pos == len(data):
            break
    return pos
