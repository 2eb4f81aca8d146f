"""Listening Unix sockets, shared by the vhost-user and the control socket."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

import trio

from ..errors import VmemdevError

log = logging.getLogger(__name__)

TRANSIENT_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED)


async def bind_unix_listener(path: str, backlog: int = 16) -> trio.socket.SocketType:
    """Listen on ``path`` (mode 0600: created under umask 0177, never briefly open).

    The path appears only once the socket listens (bound under a temporary
    name, then renamed), so a client that connects as soon as it sees the
    file is never refused. A stale socket from an earlier run is replaced;
    any other file is refused.
    """
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise VmemdevError(f"{path} exists and is not a socket")
    temporary = path + ".new"  # short: sun_path holds 107 bytes
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        await sock.bind(temporary)
        sock.listen(backlog)
        os.rename(temporary, path)
    except OSError as exc:
        sock.close()
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise VmemdevError(f"cannot listen on {path}: {exc}") from exc
    finally:
        os.umask(old_umask)
    return sock


async def accept(listener: trio.socket.SocketType) -> trio.socket.SocketType:
    """The next connection; running out of fds or memory is waited out, not fatal."""
    while True:
        try:
            sock, _ = await listener.accept()
            return sock
        except OSError as exc:
            if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                raise
            log.error("accept failed (%s); retrying in 100 ms", exc)
            await trio.sleep(0.1)


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """Send every byte; a reply that fits the socket buffer goes out without yielding.

    Raises OSError as the socket does.
    """
    view = memoryview(data)
    try:
        view = view[os.write(sock.fileno(), view):]
    except BlockingIOError:
        pass
    while view:
        view = view[await sock.send(view):]
