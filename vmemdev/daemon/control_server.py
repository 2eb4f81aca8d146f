"""The control socket: a Unix socket speaking JSON lines (see protocol/control.py).

Who may connect: root, the daemon's own uid, and members of the group given
with ``--control-group`` (checked with SO_PEERCRED, primary and
supplementary groups). The socket file is 0600, or 0660 owned by that group.

No client can hold up the device or another client: each has its own task,
lines are bounded (MAX_LINE), a client that does not read for WRITE_TIMEOUT
seconds while the daemon writes to it is dropped, event queues are bounded
(see events.py), and the number of clients is capped.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import struct

import trio

from .. import __version__
from ..errors import OperatorError, VmemdevError
from ..protocol import control as proto
from . import commands as control
from .runtime import DeviceRuntime
from .sockets import accept, bind_unix_listener, send_all

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
WRITE_TIMEOUT = 5.0
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def describe(exc: BaseException) -> str:
    """One line for a (possibly grouped) exception."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def peer_groups(pid: int) -> set[int]:
    """Supplementary groups of a peer process, from /proc (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class ControlServer:
    def __init__(self, runtime: DeviceRuntime, path: str, group: str | None = None,
                 max_clients: int = MAX_CLIENTS):
        self.runtime = runtime
        self.path = path
        self.max_clients = max_clients
        self.clients = 0
        self.gid: int | None = None
        if group is not None:
            try:
                self.gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise VmemdevError(f"--control-group {group!r}: no such group") from None

    # --- access ----------------------------------------------------------------

    def allowed(self, pid: int, uid: int, gid: int) -> str | None:
        """None if the peer may connect, else why not."""
        if uid in (0, os.getuid()):
            return None
        if self.gid is not None and (gid == self.gid or self.gid in peer_groups(pid)):
            return None
        who = f"root or uid {os.getuid()}"
        if self.gid is not None:
            who += f" or group {self.gid}"
        return f"pid {pid} uid {uid} gid {gid} is not {who}"

    async def bind(self) -> trio.socket.SocketType:
        sock = await bind_unix_listener(self.path)
        if self.gid is not None:
            os.chown(self.path, -1, self.gid)
            os.chmod(self.path, 0o660)
        return sock

    # --- serving -----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = await self.bind()
        log.info("control socket on %s", self.path)
        try:
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    nursery.start_soon(self._client, await accept(listener))
        finally:
            listener.close()
            if os.path.exists(self.path):
                os.unlink(self.path)

    async def _client(self, sock: trio.socket.SocketType) -> None:
        with sock:
            pid, uid, gid = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              PEERCRED.size))
            refusal = self.allowed(pid, uid, gid)
            if refusal:
                log.warning("control client refused: %s", refusal)
                return
            if self.clients >= self.max_clients:
                log.warning("control client pid %d refused: %d clients already", pid, self.clients)
                await self._send_quietly(sock, proto.encode_error(
                    "GenericError", f"too many clients ({self.max_clients})"))
                return
            self.clients += 1
            try:
                await ClientSession(self.runtime, sock, pid).run()
            except* Exception as group:  # a client's failure ends that client only
                log.info("control client pid %d dropped: %s", pid, describe(group))
            finally:
                self.clients -= 1

    @staticmethod
    async def _send_quietly(sock, data: bytes) -> None:
        with trio.move_on_after(1):
            try:
                await sock.send(data)
            except OSError:
                pass


class ClientSession:
    """One control client: requests in, returns and events out."""

    def __init__(self, runtime: DeviceRuntime, sock: trio.socket.SocketType, pid: int):
        self.runtime = runtime
        self.sock = sock
        self.pid = pid
        self._write_lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._write_lock:
            with trio.fail_after(WRITE_TIMEOUT):  # a client that never reads is dropped
                await send_all(self.sock, data)

    async def run(self) -> None:
        await self.send(proto.greeting(__version__))
        subscription = self.runtime.events.subscribe()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_events, subscription)
                await self._serve_requests()
                nursery.cancel_scope.cancel()
        finally:
            subscription.close()

    async def _pump_events(self, subscription) -> None:
        while True:
            event = await subscription.next()
            await self.send(proto.encode_event(event.to_json()))

    async def _serve_requests(self) -> None:
        buffer = b""
        while True:
            while b"\n" not in buffer:
                if len(buffer) > proto.MAX_LINE:
                    log.warning("control client pid %d sent a line over %d bytes; closed",
                                self.pid, proto.MAX_LINE)
                    await self.send(proto.encode_error("GenericError",
                                                       f"request line longer than {proto.MAX_LINE} bytes"))
                    return
                try:
                    chunk = await self.sock.recv(16384)
                except OSError:  # reset by a client that left with events unread
                    return
                if not chunk:
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\n")
            if line.strip():
                await self._serve_line(line)

    async def _serve_line(self, line: bytes) -> None:
        try:
            command = proto.parse_command(line)
        except proto.CommandError as exc:
            await self.send(proto.encode_error(exc.cls, exc.desc, exc.id))
            return
        if command.name != "upgrade":
            await self.send(self._answer(command))
            return
        # The answer goes out once the connection is parked, just before this
        # process is replaced: the client then waits for the new one.
        try:
            plan = await self.runtime.prepare_upgrade()
        except OperatorError as exc:
            await self.send(proto.encode_error("GenericError", str(exc), command.id))
            return
        try:
            with trio.move_on_after(1):
                await self.send(proto.encode_return(plan, command.id))
        finally:
            self.runtime.upgrade()

    def _answer(self, command: proto.Command) -> bytes:
        try:
            return proto.encode_return(control.execute(self.runtime, command), command.id)
        except proto.CommandError as exc:
            return proto.encode_error(exc.cls, exc.desc, command.id)
        except Exception as exc:  # a bug of ours must not take the daemon down
            log.exception("control command %s failed", command.name)
            return proto.encode_error("GenericError", f"internal error: {exc}", command.id)
