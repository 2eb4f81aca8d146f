"""A vhost-user front-end that behaves as QEMU 11.1's generic device does.

``Frontend`` plays QEMU's ``vhost-user-test-device-pci,virtio-id=24,
num_vqs=1,config_size=56`` and the guest's side of the virtqueue. Message
order, flags, NEED_REPLY use and fd passing follow a recorded QEMU 11.1.3
conversation (tests/data/qemu-11.1.3-linux-7.2-virtio-mem.jsonl, checked by
test_frontend_driver_speaks_like_qemu in tests/test_capture_replay.py). Guest RAM is memfd-backed and
shared exactly as ``memory-backend-memfd,share=on`` plus a ``pc-dimm`` would
share it: three regions, RAM below 640 KiB, RAM from 768 KiB, the DIMM.

The ring side drives requests like the Linux driver: one request in flight,
a readable 24-byte request descriptor chained to a writable 10-byte
response descriptor. Lower-level helpers let tests build hostile chains.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ..errors import PeerError
from ..host import probes
from ..host.memory import GpaAccess
from ..protocol import vhost_user as vu
from ..protocol import virtio_mem as vm
from ..protocol.vhost_user import MemoryRegion, ProtocolFeature, Request
from ..protocol.virtqueue import DESC, DESC_F_NEXT, DESC_F_WRITE, U16, USED_ELEM

MiB = 1 << 20
GiB = 1 << 30
# What the Linux 7.2 virtio_mem driver accepts.
LINUX_DRIVER_FEATURES = vu.VIRTIO_F_VERSION_1 | vm.Feature.ACPI_PXM | vm.Feature.UNPLUGGED_INACCESSIBLE
QEMU_QUEUE_SIZE = 64
LOW_RAM_END = 0xA0000  # 640 KiB: the VGA hole follows, as on a PC
HIGH_RAM_START = 0xC0000


class FrontendError(PeerError):
    """The back-end answered something QEMU would reject."""


def _memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


@dataclass
class SharedRegion:
    """A piece of guest RAM as it appears in the memory table."""

    gpa: int
    size: int
    fd: int
    file_offset: int
    mm: mmap.mmap
    base: int  # our address of the start of the file mapping

    def describe(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.base + self.file_offset, self.file_offset)


class GuestRam(GpaAccess):
    """memfd-backed guest RAM plus the device region's DIMM."""

    def __init__(self, ram_size: int, device_addr: int, device_size: int, dimm: bool = True):
        self.ram_fd, self.ram = _memfd("guest-ram", ram_size)
        ram_base = probes.buffer_address(self.ram)
        self.regions = [
            SharedRegion(0, LOW_RAM_END, self.ram_fd, 0, self.ram, ram_base),
            SharedRegion(
                HIGH_RAM_START, ram_size - HIGH_RAM_START, self.ram_fd, HIGH_RAM_START, self.ram, ram_base
            ),
        ]
        self.dimm_fd: int | None = None
        if dimm:
            self.dimm_fd, self.dimm = _memfd("dimm0", device_size)
            self.regions.append(
                SharedRegion(device_addr, device_size, self.dimm_fd, 0, self.dimm, probes.buffer_address(self.dimm))
            )
        self._next = 0x100000  # bump allocator for rings and buffers, from 1 MiB

    def alloc(self, size: int, align: int = 64) -> int:
        gpa = -(-self._next // align) * align
        self._next = gpa + size
        return gpa

    def gpa_area(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.mm, r.file_offset + gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x}+{length:#x} is not guest RAM")

    def dimm_file(self) -> int:
        """The device region's fd (QEMU's memory-backend file)."""
        if self.dimm_fd is None:
            raise FrontendError("this front-end has no DIMM at the device address")
        return self.dimm_fd

    def uaddr(self, gpa: int) -> int:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.base + r.file_offset + gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} is not guest RAM")

    def close(self) -> None:
        for fd, mm in ((self.ram_fd, self.ram), (self.dimm_fd, getattr(self, "dimm", None))):
            if mm is not None:
                mm.close()
            if fd is not None:
                os.close(fd)


class Ring:
    """The driver's side of one split ring in guest RAM (Linux's layout)."""

    def __init__(self, ram: GuestRam, num: int = QEMU_QUEUE_SIZE):
        self.ram = ram
        self.num = num
        self.desc = ram.alloc(16 * num, 4096)
        self.avail = self.desc + 16 * num
        self.used = -(-(self.avail + 4 + 2 * num + 2) // 64) * 64
        ram.alloc(self.used + 4 + 8 * num + 2 - self.desc)
        ram.write(self.desc, bytes(self.used + 4 + 8 * num + 2 - self.desc))
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0

    def addr_message(self, index: int = 0) -> vu.VringAddr:
        uaddr = self.ram.uaddr
        return vu.VringAddr(index, 0, uaddr(self.desc), uaddr(self.used), uaddr(self.avail), self.used)

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.ram.write(self.desc + 16 * index, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int, advance: int = 1) -> None:
        """Put ``head`` in the avail ring and move avail.idx by ``advance``."""
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.num), U16.pack(head))
        self.avail_idx = (self.avail_idx + advance) & 0xFFFF
        self.ram.write(self.avail + 2, U16.pack(self.avail_idx))

    def used_idx(self) -> int:
        return U16.unpack(self.ram.read(self.used + 2, 2))[0]

    def pop_used(self) -> tuple[int, int] | None:
        if self.used_idx() == self.used_seen:
            return None
        elem = self.ram.read(self.used + 4 + 8 * (self.used_seen % self.num), 8)
        self.used_seen = (self.used_seen + 1) & 0xFFFF
        return USED_ELEM.unpack(elem)


class Frontend:
    """QEMU's side of one vhost-user connection, plus the guest's ring."""

    def __init__(
        self,
        socket_path: str,
        device_addr: int = 0x1_0000_0000,
        device_size: int = GiB,
        ram_size: int = 64 * MiB,
        dimm: bool = True,
    ):
        self.socket_path = socket_path
        self.ram = GuestRam(ram_size, device_addr, device_size, dimm)
        self.ring = Ring(self.ram)
        self.req_gpa = self.ram.alloc(vm.REQUEST_SIZE, 8)
        self.resp_gpa = self.ram.alloc(16, 8)
        self.sock: trio.socket.SocketType | None = None
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.features = 0
        self.protocol_features = 0
        self.config_changes = 0
        self.memory_sent = False
        self._config_event = trio.Event()
        self._backend_channel: socket.socket | None = None
        self._backend_watch_sock: trio.socket.SocketType | None = None
        self.log: list[tuple[str, int, int, bytes, int]] = []  # (dir, request, flags, payload, nfds)

    # --- raw messages --------------------------------------------------------

    async def connect(self) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await self.sock.connect(self.socket_path)

    @property
    def _sock(self) -> trio.socket.SocketType:
        if self.sock is None:
            raise FrontendError("not connected")
        return self.sock

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = await self._sock.sendmsg([data], anc)
        if sent < len(data):
            await self._sock.send(data[sent:])  # only the first chunk carries the fds

    async def recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self._sock.recv(n - len(data))
            if not chunk:
                raise FrontendError("back-end closed the connection")
            data += chunk
        return data

    async def read_reply(self, request: int) -> bytes:
        """Read a reply and check it as QEMU's vhost_user_read does."""
        req, flags, size = vu.HEADER.unpack(await self.recv_exact(vu.HEADER.size))
        payload = await self.recv_exact(size) if size else b""
        self.log.append(("backend->frontend", req, flags, payload, 0))
        if flags != vu.REPLY_FLAGS:
            raise FrontendError(f"reply to {vu.request_name(request)} has flags {flags:#x}, QEMU needs 0x5")
        if req != request:
            raise FrontendError(f"reply to {vu.request_name(request)} names {vu.request_name(req)}")
        return payload

    async def call(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), need_reply: bool = False
    ) -> bytes | None:
        """Send a message; read the reply if the request has one or NEED_REPLY was set."""
        flags = vu.Flags.VERSION | (vu.Flags.NEED_REPLY if need_reply else 0)
        self.log.append(("frontend->backend", request, int(flags), payload, len(fds)))
        await self.send_raw(vu.encode(request, payload, flags), list(fds))
        if request in vu.REQUESTS_WITH_REPLY or need_reply:
            return await self.read_reply(request)
        return None

    async def call_ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A message QEMU sends with NEED_REPLY; the back-end must answer 0."""
        need = bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        reply = await self.call(request, payload, fds, need_reply=need)
        if need and reply != vu.encode_u64(0):
            raise FrontendError(f"{vu.request_name(request)} was refused: {reply!r}")

    async def ask(self, request: int, payload: bytes = b"") -> bytes:
        """A request that carries its own reply (GET_*)."""
        reply = await self.call(request, payload)
        if reply is None:
            raise FrontendError(f"{vu.request_name(request)} has no reply")
        return reply

    async def get_u64(self, request: int) -> int:
        reply = await self.ask(request)
        if len(reply) != 8:
            raise FrontendError(f"{vu.request_name(request)} reply is {len(reply)} bytes")
        return vu.U64.unpack(reply)[0]

    # --- QEMU's sequences ------------------------------------------------------

    async def realize(self) -> None:
        """What QEMU sends when the device is created (before the guest boots)."""
        await self.connect()
        self.backend_features = await self.get_u64(Request.GET_FEATURES)
        offered = await self.get_u64(Request.GET_PROTOCOL_FEATURES)
        self.protocol_features = offered & 0x1FFFFF  # all that QEMU 11.1 knows
        await self.call(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(self.protocol_features))
        if self.protocol_features & ProtocolFeature.MQ:
            self.queue_num = await self.get_u64(Request.GET_QUEUE_NUM)
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.max_mem_slots = await self.get_u64(Request.GET_MAX_MEM_SLOTS)
        if self.protocol_features & ProtocolFeature.BACKEND_REQ:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._backend_channel = ours
            await self.call_ack(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
            theirs.close()
        await self.call(Request.SET_OWNER)
        await self.get_u64(Request.GET_FEATURES)
        await self.call_ack(Request.SET_VRING_CALL, vu.encode_u64(0), [self.call_fd])
        await self.call_ack(Request.SET_VRING_ERR, vu.encode_u64(0), [self.err_fd])

    async def start(self, use_mem_table: bool = False) -> None:
        """What QEMU sends when the guest driver sets DRIVER_OK."""
        self.features = self.backend_features & LINUX_DRIVER_FEATURES | vu.VHOST_USER_F_PROTOCOL_FEATURES
        await self.call(Request.SET_FEATURES, vu.encode_u64(self.features))
        if self.protocol_features & ProtocolFeature.STATUS:
            await self.get_u64(Request.GET_STATUS)
            await self.call(Request.SET_STATUS, vu.encode_u64(0x8))  # FEATURES_OK
        if not self.memory_sent:
            # Like QEMU's shadow table: unchanged memory is not re-sent on a restart.
            await self.send_memory(use_mem_table)
        ring = self.ring
        await self.call(Request.SET_VRING_NUM, vu.encode_vring_state(0, ring.num))
        await self.call(Request.SET_VRING_BASE, vu.encode_vring_state(0, ring.avail_idx))
        await self.call(Request.SET_VRING_ADDR, vu.encode_vring_addr(ring.addr_message()))
        await self.call_ack(Request.SET_VRING_KICK, vu.encode_u64(0), [self.kick_fd])
        await self.call_ack(Request.SET_VRING_CALL, vu.encode_u64(0), [self.call_fd])
        await self.call_ack(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 1))
        await self.call_ack(Request.SET_VRING_CALL, vu.encode_u64(0), [self.call_fd])

    async def send_memory(self, use_mem_table: bool = False) -> None:
        self.memory_sent = True
        regions = [r.describe() for r in self.ram.regions]
        fds = [r.fd for r in self.ram.regions]
        if use_mem_table or not self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            await self.call_ack(Request.SET_MEM_TABLE, vu.encode_mem_table(regions), fds)
            return
        for region, fd in zip(regions, fds):
            await self.call_ack(Request.ADD_MEM_REG, vu.encode_single_region(region), [fd])

    async def stop(self) -> int:
        """Guest reset or shutdown: disable and stop the ring; returns last_avail."""
        await self.call_ack(Request.SET_VRING_ENABLE, vu.encode_vring_state(0, 0))
        reply = await self.ask(Request.GET_VRING_BASE, vu.encode_vring_state(0, 0))
        _, num = vu.VRING_STATE.unpack(reply)
        return int(num)

    async def get_config(self) -> vm.Config:
        reply = await self.ask(Request.GET_CONFIG, vu.encode_config(0, bytes(vm.CONFIG_SIZE)))
        offset, size, _ = vu.CONFIG_HEADER.unpack_from(reply)
        if offset != 0 or size != vm.CONFIG_SIZE or len(reply) != 12 + vm.CONFIG_SIZE:
            raise FrontendError(f"GET_CONFIG reply has offset {offset} size {size}")
        return vm.Config.unpack(reply[12:])

    async def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._backend_watch_sock is not None:
            self._backend_watch_sock.close()  # tells Trio's watcher before the fd goes
            self._backend_watch_sock = None
        if self._backend_channel is not None:
            self._backend_channel.close()
            self._backend_channel = None

    def release(self) -> None:
        """Free everything, as a QEMU process exiting would."""
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            os.close(fd)
        self.ram.close()

    # --- the backend channel (config notifications) --------------------------

    async def watch_backend_channel(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Count CONFIG_CHANGE_MSG messages as QEMU's backend-channel handler would."""
        if self._backend_channel is None:
            raise FrontendError("no backend channel: BACKEND_REQ was not negotiated")
        sock = self._backend_watch_sock = trio.socket.from_stdlib_socket(self._backend_channel)
        task_status.started()
        try:
            while True:
                header = await sock.recv(vu.HEADER.size)
                if not header:
                    return
                req, flags, size = vu.HEADER.unpack(header)
                if size:
                    await sock.recv(size)
                if req == vu.BackendRequest.CONFIG_CHANGE_MSG:
                    self.config_changes += 1
                    self._config_event.set()
                    self._config_event = trio.Event()
                if flags & vu.Flags.NEED_REPLY:
                    await sock.send(vu.encode_reply(req, vu.encode_u64(0)))
        except trio.ClosedResourceError:
            return  # close() was called
        except OSError:
            if self._backend_watch_sock is None:  # close() ran while a message was waking us
                return
            raise

    async def wait_config_change(self) -> None:
        await self._config_event.wait()

    # --- the guest's side of the ring ------------------------------------------

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    async def wait_used(self) -> tuple[int, int]:
        """Wait for the call eventfd and return the next used element (id, len)."""
        while True:
            elem = self.ring.pop_used()
            if elem is not None:
                return elem
            await trio.lowlevel.wait_readable(self.call_fd)
            try:
                os.eventfd_read(self.call_fd)
            except BlockingIOError:
                pass

    async def submit(self, request: bytes, response_len: int = vm.RESPONSE_SIZE) -> tuple[bytes, int]:
        """Send one request like Linux does; returns (response bytes, used length)."""
        ring = self.ring
        head = ring.next_desc
        ring.next_desc = (head + 2) % ring.num
        self.ram.write(self.req_gpa, request)
        self.ram.write(self.resp_gpa, b"\xff" * 16)  # so an unwritten response is visible
        ring.write_desc(head, self.req_gpa, len(request), DESC_F_NEXT, head + 1)
        ring.write_desc(head + 1, self.resp_gpa, response_len, DESC_F_WRITE, 0)
        ring.publish(head)
        self.kick()
        used_id, used_len = await self.wait_used()
        if used_id != head:
            raise FrontendError(f"used id {used_id} but head {head} was in flight")
        return self.ram.read(self.resp_gpa, response_len), used_len

    async def request(self, type_: int, addr: int = 0, nb_blocks: int = 0) -> vm.MemResponse:
        data, used_len = await self.submit(vm.MemRequest(type_, addr, nb_blocks).pack())
        if used_len != vm.RESPONSE_SIZE:
            raise FrontendError(f"used length {used_len}, expected {vm.RESPONSE_SIZE}")
        return vm.MemResponse.unpack(data)

    async def plug(self, addr: int, nb_blocks: int) -> int:
        return (await self.request(vm.RequestType.PLUG, addr, nb_blocks)).type

    async def unplug(self, addr: int, nb_blocks: int) -> int:
        return (await self.request(vm.RequestType.UNPLUG, addr, nb_blocks)).type

    async def unplug_all(self) -> int:
        return (await self.request(vm.RequestType.UNPLUG_ALL)).type

    async def state(self, addr: int, nb_blocks: int) -> tuple[int, int]:
        resp = await self.request(vm.RequestType.STATE, addr, nb_blocks)
        return resp.type, resp.state

    # --- the device region as the host sees it ----------------------------------

    def dimm_allocated(self) -> int:
        return probes.allocated_bytes(self.ram.dimm_file())

    def dimm_extents(self) -> list[tuple[int, int]]:
        return probes.data_extents(self.ram.dimm_file())
