"""The bench's front-end: vmemdev.testing.frontend for the handshake, then tight
synchronous loops for the timed part (no Trio scheduling on the measuring side).

Timed requests go as the Linux driver sends them: one in flight, a 24-byte
readable descriptor chained to a 10-byte writable one. A request's time runs
from just before the driver publishes it in the avail ring (then kicks) to
the moment the call eventfd has fired and the used element is read back.
The ping-pong baselines use exactly the same waiting code on this side.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import socket
import time

from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol import virtio_mem as vm
from vmemdev.protocol.virtqueue import DESC, DESC_F_NEXT, DESC_F_WRITE, U16, USED_ELEM
from vmemdev.testing.frontend import Frontend

from .common import BenchError

PLUG, UNPLUG, UNPLUG_ALL, STATE = (vm.RequestType.PLUG, vm.RequestType.UNPLUG,
                                   vm.RequestType.UNPLUG_ALL, vm.RequestType.STATE)
ACK = vm.ResponseType.ACK
perf_ns = time.perf_counter_ns


async def attach(socket_path: str, region_addr: int, region_size: int) -> Frontend:
    fe = Frontend(socket_path, device_addr=region_addr, device_size=region_size)
    await fe.realize()
    await fe.start()
    return fe


class RingClient:
    """Synchronous driver side of the one virtqueue of an attached Frontend."""

    def __init__(self, fe: Frontend):
        self.fe = fe
        self.ring = fe.ring
        self.ram = fe.ram
        self.poll = select.poll()
        self.poll.register(fe.call_fd, select.POLLIN)
        self._drain_call()

    def _drain_call(self) -> None:
        try:
            os.eventfd_read(self.fe.call_fd)
        except BlockingIOError:
            pass

    def request(self, type_: int, addr: int = 0, nb_blocks: int = 0) -> tuple[vm.MemResponse, int]:
        """One request; returns (response, ns from publish to used seen)."""
        fe, ring = self.fe, self.ring
        head = ring.next_desc
        ring.next_desc = (head + 2) % ring.num
        self.ram.write(fe.req_gpa, vm.MemRequest(type_, addr, nb_blocks).pack())
        ring.write_desc(head, fe.req_gpa, vm.REQUEST_SIZE, DESC_F_NEXT, head + 1)
        ring.write_desc(head + 1, fe.resp_gpa, vm.RESPONSE_SIZE, DESC_F_WRITE, 0)
        call_fd = fe.call_fd
        t0 = perf_ns()
        ring.publish(head)
        os.eventfd_write(fe.kick_fd, 1)
        while True:
            self.poll.poll()
            try:
                os.eventfd_read(call_fd)
            except BlockingIOError:
                pass
            elem = ring.pop_used()
            if elem is not None:
                break
        t1 = perf_ns()
        used_id, used_len = elem
        if used_id != head or used_len != vm.RESPONSE_SIZE:
            raise BenchError(f"used element ({used_id}, {used_len}) for head {head}")
        return vm.MemResponse.unpack(self.ram.read(fe.resp_gpa, vm.RESPONSE_SIZE)), t1 - t0

    def ack(self, type_: int, addr: int = 0, nb_blocks: int = 0) -> int:
        resp, ns = self.request(type_, addr, nb_blocks)
        if resp.type != ACK:
            name = vm.RequestType(type_).name
            raise BenchError(f"{name} {addr:#x}+{nb_blocks} answered {vm.ResponseType(resp.type).name}")
        return ns


@contextlib.contextmanager
def gc_paused():
    """No collection pauses inside a timed loop."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def eventfd_pingpong(kick_fd: int, call_fd: int, n: int) -> list[int]:
    """The same waiting code as RingClient.request, against an echo process."""
    p = select.poll()
    p.register(call_fd, select.POLLIN)
    out = []
    with gc_paused():
        for _ in range(n):
            t0 = perf_ns()
            os.eventfd_write(kick_fd, 1)
            while True:
                p.poll()
                try:
                    os.eventfd_read(call_fd)
                    break
                except BlockingIOError:
                    pass
            out.append(perf_ns() - t0)
    return out


def socket_roundtrips(sock: socket.socket, message: bytes, reply_size: int, n: int,
                      check=None) -> list[int]:
    """Send `message`, wait for `reply_size` bytes; same code for the daemon and the echo."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    out = []
    with gc_paused():
        for _ in range(n):
            t0 = perf_ns()
            sock.send(message)
            got = b""
            while len(got) < reply_size:
                p.poll()
                try:
                    chunk = sock.recv(reply_size - len(got))
                except BlockingIOError:
                    continue
                if not chunk:
                    raise BenchError("peer closed the socket")
                got += chunk
            out.append(perf_ns() - t0)
            if check is not None:
                check(got)
    return out


def get_config_message() -> bytes:
    """GET_CONFIG exactly as QEMU sends it: 12-byte header + 68-byte payload."""
    return vu.encode(vu.Request.GET_CONFIG, vu.encode_config(0, bytes(vm.CONFIG_SIZE)), vu.Flags.VERSION)


def frontend_socket(fe: Frontend) -> socket.socket:
    """A stdlib view of the front-end's (nonblocking) vhost-user socket, for sync loops."""
    return socket.socket(fileno=os.dup(fe.sock.fileno()))


__all__ = ["attach", "RingClient", "eventfd_pingpong", "socket_roundtrips", "get_config_message",
           "frontend_socket", "PLUG", "UNPLUG", "UNPLUG_ALL", "STATE", "DESC", "U16", "USED_ELEM"]
