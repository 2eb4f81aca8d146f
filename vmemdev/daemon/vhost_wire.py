"""Reading vhost-user messages and their fds from a front-end's socket.

A header we cannot trust to find the next message closes the connection
(``ConnectionClosed``); a whole message that cannot be used is refused
(``RefusedMessage``) and the stream goes on.

``peek_message`` reads a message without taking it off the socket (its fds
come as copies), and ``finish_message`` takes it off once it has been
handled, after keeping its reply in the journal of the message in flight
(``daemon/inflight.py``, with a state file), then sends the reply: a
process that dies in between leaves the message, fds included, or its
reply for its successor, which shares the socket. Both are single calls of
the C shim (``host/messages.py``): a vCPU waits for every GET_CONFIG.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Callable, Iterable

from ..errors import PeerError
from ..host import messages
from ..protocol import vhost_user as vu

FD_BYTES = array.array("i").itemsize


class ConnectionClosed(PeerError):
    """The peer closed the stream or sent something we cannot resynchronise after."""


class RefusedMessage(PeerError):
    """A whole message arrived but cannot be used (its fds were cut off)."""

    def __init__(self, request: int, flags: int, reason: str, length: int = 0):
        self.request = request
        self.flags = flags
        self.length = length  # bytes still to consume (a peeked message), else 0
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


PEEK_SIZE = vu.HEADER.size + vu.MAX_PAYLOAD + 1
FD_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * FD_BYTES)


def message_io() -> messages.MessageIo:
    """A connection's buffers for ``peek_message`` and ``finish_message``."""
    return messages.MessageIo(PEEK_SIZE, vu.MAX_FDS + 1)  # one more: "too many fds" is seen as such


def peek_message(sock: socket.socket, wait_readable: Callable[[], None], wait_more: Callable[[], bool],
                 io: messages.MessageIo) -> tuple[int, int, bytes, tuple[int, ...], int] | None:
    """The next whole message, left on the socket: (request, flags, payload,
    fds, length); the fds are ours (copies), ``length`` is what
    ``finish_message`` (or ``consume``) takes off once it is handled.
    ``wait_readable`` blocks until data arrives; ``wait_more`` until more of
    a partial message may have (True: the front-end has closed its end).

    None: the message's fds came in a piece shorter than the message, which
    a peek cannot see past; read it with ``read_message`` (QEMU sends each
    message, fds included, in one piece). Raises as ``read_message`` does;
    a refused message carries its length.
    """
    closed = False
    buf = io.data
    fd = sock.fileno()
    while True:
        n = io.peek(fd)
        if n <= 0:
            n = _peek_again(n, sock, wait_readable, io)
        fds = io.fds()
        request = None
        if n >= vu.HEADER.size:
            try:
                request, msg_flags, size = vu.parse_header(buf)
            except PeerError as exc:
                close_all(fds or ())
                raise ConnectionClosed(f"{exc}; the stream cannot be trusted any more") from exc
            length = vu.HEADER.size + size
            if n > length:  # a peek stops after a piece with fds: these are a later message's
                close_all(fds or ())
                return request, msg_flags, bytes(buf[vu.HEADER.size:length]), (), length
            if n == length:
                if fds is None or len(fds) > vu.MAX_FDS:
                    close_all(fds or ())
                    raise RefusedMessage(request, msg_flags, f"{vu.request_name(request)}: more file "
                                         f"descriptors than {vu.MAX_FDS}", length)
                return request, msg_flags, bytes(buf[vu.HEADER.size:length]), tuple(fds), length
        if fds != []:  # a piece with fds ends before the message does
            close_all(fds or ())
            return None
        if closed:  # and nothing more came since
            if request is None:
                raise ConnectionClosed(f"front-end closed the socket inside a header ({n} of 12 bytes)")
            raise ConnectionClosed(f"front-end closed the socket inside {vu.request_name(request)}'s payload")
        closed = wait_more()


def _peek_again(n: int, sock: socket.socket, wait_readable: Callable[[], None], io: messages.MessageIo) -> int:
    """A peek that gave nothing (``n``: 0 or -errno): wait for data and peek
    again; raises ConnectionClosed when the front-end has closed or failed.
    A peek copies on through the pieces the front-end sent until one that
    carried fds (or until PEEK_SIZE, one more than a message can be: so a
    peek that ends exactly where the message does was stopped by the
    message's own fds, or by the end of data)."""
    while n <= 0:
        if n == 0:
            close_all(io.fds() or ())
            raise ConnectionClosed("front-end closed the socket")
        if n != -errno.EAGAIN:
            raise ConnectionClosed(f"front-end connection failed: {os.strerror(-n)}")
        wait_readable()
        n = io.peek(sock.fileno())
    return n


def finish_message(sock: socket.socket, io: messages.MessageIo, journal: object, request: int,
                   length: int, reply: bytes, wait_readable: Callable[[], None],
                   steps: int = messages.MSG_ALL) -> int:
    """The end of a peeked message (``vmem_msg_finish``): its reply kept in
    the journal (``journal``: the InFlight's ``shim.pointer``, or None), the
    message taken off the socket, the reply sent; only ``steps`` of these.
    Returns how much of the reply was sent (the caller sends the rest: the
    socket was full). Raises ConnectionClosed."""
    rc = io.finish(sock.fileno(), journal, request, length, reply, steps)
    if rc >= 0:
        return rc
    if steps & messages.MSG_CONSUME and io.consumed < length:  # the consume stopped
        if rc != -errno.EAGAIN:
            reason = "closed" if rc == -errno.EPIPE else f"failed: {os.strerror(-rc)}"
            raise ConnectionClosed(f"front-end connection {reason} while a message was taken off")
        consume(sock, length - io.consumed, wait_readable, io.data)
        return finish_message(sock, io, journal, request, length, reply, wait_readable, steps & messages.MSG_SEND)
    raise ConnectionClosed(f"cannot answer the front-end: {os.strerror(-rc)}")


def consume(sock: socket.socket, length: int, wait_readable: Callable[[], None], buf: bytearray) -> None:
    """Take ``length`` bytes (a message peeked whole) off the socket, read
    into ``buf`` (at least PEEK_SIZE) and dropped. The fds that came with
    them are not received: the kernel closes them."""
    while length:
        try:
            n = sock.recv_into(buf, length)
        except BlockingIOError:
            wait_readable()
            continue
        except OSError as exc:
            raise ConnectionClosed(f"front-end connection failed: {exc}") from exc
        if not n:
            raise ConnectionClosed("front-end closed the socket")
        length -= n


def head_message(sock: socket.socket) -> tuple[int, int] | None:
    """(request, length) of the message at the head of the socket, without
    waiting or taking anything; None when there is no whole header."""
    try:
        data, ancdata, _, _ = sock.recvmsg(vu.HEADER.size, FD_SPACE, socket.MSG_PEEK | socket.MSG_DONTWAIT
                                           | socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return None
    fds: list[int] = []
    _take_fds(ancdata, fds)
    close_all(fds)
    if len(data) < vu.HEADER.size:
        return None
    request, _, size = vu.HEADER.unpack_from(data)
    return request, vu.HEADER.size + size
