"""Clients for the control socket: ``Client`` (blocking) and ``AsyncClient`` (Trio).

    with Client("/run/vmemdev/vm0.ctl") as c:
        c.execute("resize", size="512M")
        status = c.execute("query-status")

Events that arrive while waiting for a return are kept in ``pending_events``.
Errors come back as ``ControlError`` with the daemon's class and description.
"""

from __future__ import annotations

import collections
import json
import socket

import trio

from .closing import Closing
from .errors import OperatorError, PeerError


class ControlError(OperatorError):
    """The daemon refused a control command (QMP-style class and description)."""

    def __init__(self, cls: str, desc: str):
        self.cls = cls
        self.desc = desc
        super().__init__(f"{desc} ({cls})")


def _check_greeting(obj: dict) -> dict:
    if "vmemdev" not in obj:
        raise PeerError(f"not a vmemdev control socket (greeting {obj!r})")
    return obj["vmemdev"]


def _result(obj: dict):
    if "error" in obj:
        raise ControlError(obj["error"].get("class", "GenericError"), obj["error"].get("desc", ""))
    return obj["return"]


class Client(Closing):
    def __init__(self, path: str, timeout: float | None = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise OperatorError(f"cannot connect to the control socket {path}: {exc}") from exc
        self._file = self.sock.makefile("rb")
        self.pending_events: collections.deque[dict] = collections.deque()
        self.greeting = _check_greeting(self._read())
        self._next_id = 0

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise PeerError("the daemon closed the control connection")
        return json.loads(line)

    def execute(self, command: str, **arguments):
        self._next_id += 1
        request = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            obj = self._read()
            if "event" in obj:
                self.pending_events.append(obj)
            elif obj.get("id") == self._next_id:
                return _result(obj)

    def next_event(self) -> dict:
        """Block until the next event (pending ones first)."""
        if self.pending_events:
            return self.pending_events.popleft()
        while True:
            obj = self._read()
            if "event" in obj:
                return obj

    def close(self) -> None:
        self._file.close()
        self.sock.close()


class AsyncClient:
    """The same protocol for Trio programs and tests."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self._buffer = b""
        self.pending_events: collections.deque[dict] = collections.deque()
        self._next_id = 0
        self.greeting: dict = {}

    @classmethod
    async def connect(cls, path: str) -> AsyncClient:
        client = cls(await trio.open_unix_socket(path))
        client.greeting = _check_greeting(await client._read())
        return client

    async def _read(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise PeerError("the daemon closed the control connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    async def execute(self, command: str, **arguments):
        self._next_id += 1
        request = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        await self.stream.send_all(json.dumps(request).encode() + b"\n")
        while True:
            obj = await self._read()
            if "event" in obj:
                self.pending_events.append(obj)
            elif obj.get("id") == self._next_id:
                return _result(obj)

    async def next_event(self) -> dict:
        if self.pending_events:
            return self.pending_events.popleft()
        while True:
            obj = await self._read()
            if "event" in obj:
                return obj

    async def aclose(self) -> None:
        await self.stream.aclose()
