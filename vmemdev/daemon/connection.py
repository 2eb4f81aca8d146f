"""One attached front-end (one QEMU): its socket, its fds, its engine.

Bytes and fds come in here; ``vhost.Engine`` decides what they mean and
hands back a reply and effects; this class owns every fd the engine names
(kick, call and err eventfds, the backend channel) and the tasks that wait
on them. A front-end that breaks the protocol gets a logged error and,
where it waits for an answer, a failure reply; only a stream we can no
longer parse closes its connection.

Per ring, a kick watcher serves the ring itself when nothing else holds the
request lock, else wakes the ring's worker. The lock keeps a request in
flight apart from messages that change what it uses (``engine.QUIESCE``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from ..errors import PeerError
from ..protocol import vhost_user as vu
from ..vhost.engine import QUIESCE, BackendChannel, Effect, Engine, RingFd, RingRequest, Serve
from ..vhost.interfaces import Device, GuestMemory
from .sockets import send_all
from .trace import Tracer
from .vhost_wire import ConnectionClosed, RefusedMessage, close_all, read_message

log = logging.getLogger(__name__)

ServeRequest = Callable[[RingRequest], Awaitable[bytes]]


def _close(fd: int | None) -> None:
    if fd is not None:
        close_all((fd,))


class RingTasks:
    """The daemon's side of one ring: its eventfds and the tasks that wait on them."""

    def __init__(self, index: int):
        self.index = index
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.watcher: trio.CancelScope | None = None
        self.wakeup = trio.Event()

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        if self.kick_fd is not None:
            trio.lowlevel.notify_closing(self.kick_fd)

    def signal_used(self) -> None:
        if self.call_fd is None:
            return
        try:
            os.eventfd_write(self.call_fd, 1)
        except OSError as exc:
            log.error("vring %d: cannot signal the call eventfd: %s", self.index, exc)

    def close(self) -> None:
        self.stop_watching()
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            _close(fd)
        self.kick_fd = self.call_fd = self.err_fd = None


class FrontendConnection:
    def __init__(self, sock: trio.socket.SocketType, device: Device, memory: GuestMemory,
                 serve_request: ServeRequest, tracer: Tracer | None = None):
        self.sock = sock
        self.engine = Engine(device, memory)
        self.serve_request = serve_request
        self.max_request = getattr(device, "max_request", 256)
        self.tracer = tracer
        self.request_lock = trio.Lock()
        self.rings = [RingTasks(i) for i in range(device.num_queues)]
        self._notify_send, self._notify_recv = trio.open_memory_channel[None](64)
        self._backend_sock: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def memory(self) -> GuestMemory:
        return self.engine.memory

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for ring in self.rings:
                    nursery.start_soon(self._ring_worker, ring)
                nursery.start_soon(self._send_config_changes)
                try:
                    await self._serve_messages()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.close()
            self.sock.close()

    def close(self) -> None:
        """Close every fd this connection holds (the socket is the caller's)."""
        for ring in self.rings:
            ring.close()
        if self._backend_sock is not None:
            self._backend_sock.close()
        self.engine.close()

    # --- messages ----------------------------------------------------------------

    async def _serve_messages(self) -> None:
        while True:
            try:
                try:
                    request, flags, payload, fds = await read_message(self.sock)
                    if self.tracer:
                        self.tracer.record(True, request, flags, payload, len(fds))
                except RefusedMessage as exc:
                    reply = self._failure(exc.request, exc.flags, exc)
                    request = exc.request
                else:
                    reply = await self._dispatch(request, flags, payload, fds)
                if reply is not None:
                    if self.tracer:
                        self.tracer.record(False, request, int(vu.REPLY_FLAGS), reply, 0)
                    try:
                        await send_all(self.sock, vu.encode_reply(request, reply))
                    except OSError as exc:
                        raise ConnectionClosed(f"cannot answer the front-end: {exc}") from exc
            except ConnectionClosed as exc:
                log.info("front-end disconnected: %s", exc)
                return

    async def _dispatch(self, request: int, flags: int, payload: bytes,
                        fds: tuple[int, ...]) -> bytes | None:
        try:
            msg = vu.decode(request, flags, payload, fds)
        except PeerError as exc:
            close_all(fds)
            return self._failure(request, flags, exc)
        log.debug("<- %s %s", msg.name, msg.body if request != vu.Request.GET_CONFIG else "")
        kept: frozenset[int] = frozenset()
        try:
            if request in QUIESCE:
                async with self.request_lock:  # no request in flight uses what changes
                    outcome = self.engine.handle(msg)
            else:
                outcome = self.engine.handle(msg)
            if outcome.effects:
                self._apply(outcome.effects)
            kept = outcome.kept_fds
            return outcome.reply
        except PeerError as exc:
            return self._failure(request, flags, exc)
        finally:
            close_all(fd for fd in fds if fd not in kept)

    def _failure(self, request: int, flags: int, exc: Exception) -> bytes | None:
        """Log a refused message; answer a failure where the front-end waits for one.

        With REPLY_ACK negotiated, NEED_REPLY gets a non-zero status. A request
        that carries its own reply (GET_*), or an unknown one the front-end may
        be waiting on, has no honest failure answer: the connection is closed.
        """
        acked = bool(flags & vu.Flags.NEED_REPLY) and self.engine.reply_ack
        if request in vu.REQUESTS_WITH_REPLY or not (vu.is_known(request) or acked):
            log.error("front-end protocol error: %s; closing the connection", exc)
            raise ConnectionClosed("closed after a protocol error")
        if acked:
            log.error("front-end protocol error: %s; answered failure", exc)
            return vu.encode_u64(1)
        log.error("front-end protocol error: %s; message ignored", exc)
        return None

    # --- effects: the fds the engine handed over ------------------------------------

    def _apply(self, effects: tuple[Effect, ...]) -> None:
        """Take what the engine handed over. Raises PeerError for an unusable fd
        (before keeping it: the caller then closes it)."""
        for effect in effects:
            if isinstance(effect, RingFd) and effect.fd is not None:
                try:  # a peer's fd must never block the daemon (a full pipe posing as an eventfd)
                    os.set_blocking(effect.fd, False)
                except OSError as exc:
                    raise PeerError(f"ring {effect.index}: unusable fd ({exc})") from exc
            elif isinstance(effect, BackendChannel):
                self._set_backend_channel(effect.fd)
        for effect in effects:
            if isinstance(effect, Serve):
                self.rings[effect.index].wakeup.set()
            elif isinstance(effect, RingFd):
                self._set_ring_fd(effect)

    def _set_ring_fd(self, effect: RingFd) -> None:
        ring = self.rings[effect.index]
        if effect.kind == "kick":
            ring.stop_watching()
            _close(ring.kick_fd)
            ring.kick_fd = effect.fd
            if effect.fd is not None and self._nursery is not None:
                ring.watcher = trio.CancelScope()
                self._nursery.start_soon(self._kick_watcher, ring, effect.fd, ring.watcher)
        elif effect.kind == "call":
            _close(ring.call_fd)
            ring.call_fd = effect.fd
        else:
            _close(ring.err_fd)
            ring.err_fd = effect.fd

    def _set_backend_channel(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # the fd stays the caller's, who closes it
            raise PeerError(f"SET_BACKEND_REQ_FD: not a socket ({exc})") from exc
        if self._backend_sock is not None:
            self._backend_sock.close()
        self._backend_sock = trio.socket.from_stdlib_socket(sock)

    # --- ring requests ------------------------------------------------------------------

    async def _kick_watcher(self, ring: RingTasks, fd: int, scope: trio.CancelScope) -> None:
        lock = self.request_lock
        with scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                    os.eventfd_read(fd)
                except (OSError, trio.ClosedResourceError) as exc:
                    log.error("vring %d: kick fd failed (%s); waiting for a new one", ring.index, exc)
                    return
                # Serve the ring from here when nobody holds or waits for the
                # lock: waking the worker task (and the lock's checkpoint) would
                # cost two more passes of the scheduler per request.
                try:
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    ring.wakeup.set()
                    continue
                try:
                    await self._drain_locked(ring)
                finally:
                    lock.release()
                if scope.cancel_called:  # replaced or stopped while we served: the fd may be gone
                    return

    async def _ring_worker(self, ring: RingTasks) -> None:
        while True:
            await ring.wakeup.wait()
            ring.wakeup = trio.Event()
            async with self.request_lock:
                await self._drain_locked(ring)

    async def _drain_locked(self, ring: RingTasks) -> None:
        # A request runs to its used-ring entry even if we are being cancelled
        # (shutdown): its discard may already have happened. The device shields
        # the host work it awaits; nothing else here is a checkpoint.
        engine = self.engine
        while (request := engine.take(ring.index, self.max_request)) is not None:
            response = await self.serve_request(request) if request.chain is not None else b""
            engine.complete(request, response)
            ring.signal_used()

    # --- config-change notifications (backend channel) ---------------------------------

    def notify_config_change(self) -> None:
        try:
            self._notify_send.send_nowait(None)
        except trio.WouldBlock:
            log.warning("config notifications are backing up; the driver re-reads config anyway")

    async def _send_config_changes(self) -> None:
        message = vu.encode(vu.BackendRequest.CONFIG_CHANGE_MSG)  # never NEED_REPLY
        async for _ in self._notify_recv:
            if self._backend_sock is None:
                log.warning("no backend channel (SET_BACKEND_REQ_FD): cannot notify the driver")
                continue
            try:
                await send_all(self._backend_sock, message)
                if self.tracer:
                    self.tracer.record(False, vu.BackendRequest.CONFIG_CHANGE_MSG, int(vu.Flags.VERSION),
                                       b"", 0, channel="backend")
                log.info("config change notified to the front-end")
            except OSError as exc:
                log.error("cannot send CONFIG_CHANGE_MSG: %s", exc)
