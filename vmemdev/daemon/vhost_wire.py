"""Reading vhost-user messages and their fds from a front-end's socket.

A header we cannot trust to find the next message closes the connection
(``ConnectionClosed``); a whole message that cannot be used is refused
(``RefusedMessage``) and the stream goes on.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Callable, Iterable

from ..errors import PeerError
from ..protocol import vhost_user as vu

FD_BYTES = array.array("i").itemsize


class ConnectionClosed(PeerError):
    """The peer closed the stream or sent something we cannot resynchronise after."""


class RefusedMessage(PeerError):
    """A whole message arrived but cannot be used (its fds were cut off)."""

    def __init__(self, request: int, flags: int, reason: str):
        self.request = request
        self.flags = flags
        super().__init__(reason)


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _take_fds(ancdata: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % FD_BYTES
            fds.extend(array.array("i", data[:usable]))


def read_message(sock: socket.socket, wait_readable: Callable[[], None]) -> tuple[int, int, bytes, tuple[int, ...]]:
    """Read one (request, flags, payload, fds) from a non-blocking socket;
    ``wait_readable`` blocks until more may be read (and may raise to give up).

    EOF raises ConnectionClosed. A header we cannot trust to find the next
    message (version, size bound) raises ConnectionClosed; a whole message
    whose fds were cut off raises RefusedMessage. Either way the fds that
    came with it are closed.
    """
    header = b""
    fds: list[int] = []
    truncated = False
    try:
        while len(header) < vu.HEADER.size:
            try:
                data, ancdata, flags, _ = sock.recvmsg(
                    vu.HEADER.size - len(header),
                    socket.CMSG_SPACE(vu.MAX_FDS * FD_BYTES),
                    socket.MSG_CMSG_CLOEXEC,
                )
            except BlockingIOError:
                wait_readable()
                continue
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
        except PeerError as exc:
            raise ConnectionClosed(f"{exc}; the stream cannot be trusted any more") from exc
        payload = b""
        while len(payload) < size:
            try:
                data = sock.recv(size - len(payload))
            except BlockingIOError:
                wait_readable()
                continue
            except OSError as exc:
                raise ConnectionClosed(f"front-end connection failed: {exc}") from exc
            if not data:
                raise ConnectionClosed(
                    f"front-end closed the socket inside {vu.request_name(request)}'s payload"
                )
            payload += data
    except BaseException:
        close_all(fds)
        raise
    if truncated or len(fds) > vu.MAX_FDS:
        close_all(fds)
        raise RefusedMessage(
            request, flags, f"{vu.request_name(request)}: more file descriptors than {vu.MAX_FDS}"
        )
    return request, flags, payload, tuple(fds)
