"""The Trio layer: the vhost-user socket, one front-end at a time, signals.

It moves bytes and file descriptors; ``BackendSession`` decides what they
mean. A front-end that breaks the protocol gets a logged error and, where
it waits for an answer, a failure reply; only a stream we can no longer
parse (short header, absurd size) closes its connection. Nothing a peer
sends can stop the daemon.

Reconnect policy: the device (its bitmap, sizes and the memory plugged
blocks live in) outlives a front-end connection. A new front-end sees the
same plugged_size; a Linux guest driver that finds plugged memory at probe
sends UNPLUG_ALL first, which discards through the new memory table.
"""

from __future__ import annotations

import array
import contextlib
import functools
import logging
import os
import signal
import socket

import trio

from . import systemd
from .backend import BackendSession
from .control_server import ControlServer
from .control_server import describe
from ..errors import PeerProtocolError, VmemdevError
from ..protocol import vhost_user as vu
from .service import DeviceService
from .sockets import accept
from .sockets import bind_unix_listener
from ..sizes import format_size
from .trace import Tracer

log = logging.getLogger(__name__)

FD_BYTES = array.array("i").itemsize


class ConnectionClosed(Exception):
    """The peer closed the stream or sent something we cannot resynchronise after."""


class RefusedMessage(PeerProtocolError):
    """A whole message arrived but cannot be used (its fds were cut off)."""

    def __init__(self, request: int, flags: int, reason: str):
        self.request = request
        self.flags = flags
        super().__init__(reason)


def _leaves(group: BaseException):
    if isinstance(group, BaseExceptionGroup):
        for exc in group.exceptions:
            yield from _leaves(exc)
    else:
        yield group


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _take_fds(ancdata, fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % FD_BYTES
            fds.extend(array.array("i", data[:usable]))


async def read_message(sock: trio.socket.SocketType) -> tuple[int, int, bytes, tuple[int, ...]]:
    """Read one (request, flags, payload, fds); raises ConnectionClosed at EOF.

    A header we cannot trust to find the next message (version, size bound)
    raises ConnectionClosed; a whole message whose fds were cut off raises
    RefusedMessage. Either way the fds that came with it are closed.
    """
    header = b""
    fds: list[int] = []
    truncated = False
    try:
        while len(header) < vu.HEADER.size:
            try:
                data, ancdata, flags, _ = await sock.recvmsg(
                    vu.HEADER.size - len(header),
                    socket.CMSG_SPACE(vu.MAX_FDS * FD_BYTES),
                    socket.MSG_CMSG_CLOEXEC,
                )
            except OSError as exc:
                raise ConnectionClosed(f"front-end connection failed: {exc}") from exc
            _take_fds(ancdata, fds)
            truncated |= bool(flags & socket.MSG_CTRUNC)
            if not data:
                if header:
                    raise ConnectionClosed(f"front-end closed the socket inside a header ({len(header)} of 12 bytes)")
                raise ConnectionClosed("front-end closed the socket")
            header += data
        try:
            request, flags, size = vu.parse_header(header)
        except PeerProtocolError as exc:
            raise ConnectionClosed(f"{exc}; the stream cannot be trusted any more") from exc
        payload = b""
        while len(payload) < size:
            try:
                # The payload is normally already here: take it without a trip
                # through the scheduler (a Trio socket op always yields once).
                try:
                    data = os.read(sock.fileno(), size - len(payload))
                except BlockingIOError:
                    data = await sock.recv(size - len(payload))
            except OSError as exc:
                raise ConnectionClosed(f"front-end connection failed: {exc}") from exc
            if not data:
                raise ConnectionClosed(
                    f"front-end closed the socket inside {vu.request_name(request)}'s payload"
                )
            payload += data
    except BaseException:
        _close_all(fds)
        raise
    if truncated or len(fds) > vu.MAX_FDS:
        _close_all(fds)
        raise RefusedMessage(
            request, flags, f"{vu.request_name(request)}: more file descriptors than {vu.MAX_FDS}"
        )
    return request, flags, payload, tuple(fds)


class FrontendConnection:
    """One attached front-end (one QEMU) and its session."""

    def __init__(self, sock: trio.socket.SocketType, service: DeviceService, tracer: Tracer | None = None):
        self.sock = sock
        self.service = service
        self.tracer = tracer
        self.session: BackendSession | None = None
        self._notify_send, self._notify_recv = trio.open_memory_channel(64)
        self._backend_sock: trio.socket.SocketType | None = None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.session = BackendSession(self.service, nursery)
                self.session.on_backend_fd = self._set_backend_fd
                self.service.set_notifier(self._queue_config_change)
                nursery.start_soon(self._send_config_changes)
                try:
                    await self._serve_messages()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.service.set_notifier(None)
            if self.session is not None:
                self.session.close()
            if self._backend_sock is not None:
                self._backend_sock.close()
            self.sock.close()

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
            except ConnectionClosed as exc:
                log.info("front-end disconnected: %s", exc)
                return
            if reply is not None:
                if self.tracer:
                    self.tracer.record(False, request, int(vu.REPLY_FLAGS), reply, 0)
                try:
                    await self._send(vu.encode_reply(request, reply))
                except ConnectionClosed as exc:
                    log.info("front-end disconnected: %s", exc)
                    return

    async def _dispatch(self, request: int, flags: int, payload: bytes, fds) -> bytes | None:
        try:
            msg = vu.decode(request, flags, payload, fds)
        except PeerProtocolError as exc:
            _close_all(fds)
            return self._failure(request, flags, exc)
        log.debug("<- %s %s", msg.name, msg.body if request != vu.Request.GET_CONFIG else "")
        try:
            return await self.session.handle(msg)
        except PeerProtocolError as exc:
            return self._failure(request, flags, exc)
        finally:
            _close_all(fd for fd in fds if fd not in self.session.kept_fds)

    def _failure(self, request: int, flags: int, exc: Exception) -> bytes | None:
        """Log a refused message; answer a failure where the front-end waits for one.

        With REPLY_ACK negotiated, NEED_REPLY gets a non-zero status. A request
        that carries its own reply (GET_*), or an unknown one the front-end may
        be waiting on, has no honest failure answer: the connection is closed.
        """
        acked = bool(flags & vu.Flags.NEED_REPLY) and self.session is not None and self.session.reply_ack
        if request in vu.REQUESTS_WITH_REPLY or not (vu.is_known(request) or acked):
            log.error("front-end protocol error: %s; closing the connection", exc)
            raise ConnectionClosed("closed after a protocol error")
        if acked:
            log.error("front-end protocol error: %s; answered failure", exc)
            return vu.encode_u64(1)
        log.error("front-end protocol error: %s; message ignored", exc)
        return None

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            try:  # a reply fits the socket buffer: send it without yielding first
                view = view[os.write(self.sock.fileno(), view):]
            except BlockingIOError:
                pass
            while view:
                view = view[await self.sock.send(view):]
        except OSError as exc:
            raise ConnectionClosed(f"cannot answer the front-end: {exc}") from exc

    # --- config-change notifications (backend channel) -------------------

    def _set_backend_fd(self, fd: int) -> None:
        """Take ownership of the SET_BACKEND_REQ_FD socket."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # the fd stays the caller's, who closes it
            raise PeerProtocolError(f"SET_BACKEND_REQ_FD: not a socket ({exc})") from exc
        if self._backend_sock is not None:
            self._backend_sock.close()
        self._backend_sock = trio.socket.from_stdlib_socket(sock)

    def _queue_config_change(self) -> None:
        try:
            self._notify_send.send_nowait(None)
        except trio.WouldBlock:
            log.warning("config notifications are backing up; the driver re-reads config anyway")

    async def _send_config_changes(self) -> None:
        message = vu.encode(vu.BackendRequest.CONFIG_CHANGE_MSG)  # never NEED_REPLY: see module doc
        async for _ in self._notify_recv:
            if self._backend_sock is None:
                log.warning("no backend channel (SET_BACKEND_REQ_FD): cannot notify the driver")
                continue
            try:
                view = memoryview(message)
                while view:
                    view = view[await self._backend_sock.send(view) :]
                if self.tracer:
                    self.tracer.record(False, vu.BackendRequest.CONFIG_CHANGE_MSG, int(vu.Flags.VERSION),
                                       b"", 0, channel="backend")
                log.info("config change notified to the front-end")
            except OSError as exc:
                log.error("cannot send CONFIG_CHANGE_MSG: %s", exc)


async def serve_listener(
    listener: trio.socket.SocketType,
    service: DeviceService,
    *,
    tracer: Tracer | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept front-ends one at a time; refuse a second while one is attached."""
    async def handle(sock: trio.socket.SocketType) -> None:
        log.info("front-end connected")
        service.events.publish("FRONTEND_CONNECTED")
        try:
            await FrontendConnection(sock, service, tracer).run()
        except* Exception as group:  # one front-end's failure never stops the daemon
            expected = all(isinstance(e, (VmemdevError, OSError)) for e in _leaves(group))
            log.error("front-end connection ended by an error: %s", describe(group),
                      exc_info=not expected)
        finally:
            service.frontend_attached = False
            service.sessions_ended += 1
            service.events.publish("FRONTEND_DISCONNECTED", plugged=service.device.plugged_size)
            log.info(
                "front-end detached; device keeps plugged=%d requested=%d",
                service.device.plugged_size,
                service.device.requested_size,
            )

    task_status.started()
    async with trio.open_nursery() as nursery:
        while True:
            sock = await accept(listener)
            if service.frontend_attached:
                log.warning("refused a second front-end connection: this device already has one")
                sock.close()
                continue
            service.frontend_attached = True
            nursery.start_soon(handle, sock)


def status_line(service: DeviceService) -> str:
    d = service.device
    return (f"plugged {format_size(d.plugged_size)}, requested {format_size(d.requested_size)}, "
            f"front-end {'attached' if service.frontend_attached else 'waiting'}")


async def report_status(service: DeviceService, interval: float = 1.0) -> None:
    """Keep systemd's STATUS= (systemctl status) current."""
    last = None
    while True:
        line = status_line(service)
        if line != last:
            systemd.notify("STATUS=" + line)
            last = line
        await trio.sleep(interval)


async def serve(
    service: DeviceService,
    *,
    socket_path: str | None = None,
    listen_fd: int | None = None,
    trace_path: str | None = None,
    control: ControlServer | None = None,
    handle_signals: bool = True,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the device (and its control socket) until cancelled or SIGTERM/SIGINT.

    ``handle_signals=False`` lets an embedding program (or a test running Trio
    outside the main thread) keep signals to itself.
    """
    # Signals first: from the moment the socket exists, SIGTERM means a clean exit.
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT)) \
            if handle_signals else None
        if listen_fd is not None:
            listener = trio.socket.from_stdlib_socket(socket.socket(fileno=listen_fd))
            where = f"fd {listen_fd}"
        else:
            listener = await bind_unix_listener(socket_path)
            where = socket_path
        stack.callback(listener.close)
        if listen_fd is None:
            stack.callback(lambda: os.path.exists(socket_path) and os.unlink(socket_path))
        g = service.geometry
        log.info(
            "serving virtio-mem on %s: region %#x+%#x, block %#x, requested %#x",
            where, g.addr, g.region_size, g.block_size, service.device.requested_size,
        )
        tracer = Tracer.open(trace_path) if trace_path else None
        if tracer:
            stack.callback(tracer.close)
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_listener, listener, service, tracer=tracer))
            if control is not None:
                await nursery.start(control.run)
            await nursery.start(service.monitor)
            nursery.start_soon(report_status, service)
            systemd.notify("READY=1")
            task_status.started()
            if signals is None:
                await trio.sleep_forever()
            async for signum in signals:
                log.info("received %s, exiting", signal.Signals(signum).name)
                systemd.notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break
