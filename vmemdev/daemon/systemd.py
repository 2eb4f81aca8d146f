"""What a daemon owes systemd: sd_notify, socket activation, journal-aware logs.

Implemented from the documented protocols (sd_notify(3), sd_listen_fds(3),
systemd.exec JOURNAL_STREAM) with the stdlib, so no libsystemd binding is
needed.
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence

SD_LISTEN_FDS_START = 3

# syslog priorities for journald's "<N>" line prefixes
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def notify(state: str, fds: Sequence[int] = ()) -> bool:
    """Send one sd_notify message ("READY=1", "STATUS=...", "STOPPING=1"), with
    ``fds`` attached (for FDSTORE=1); False without a service manager."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendmsg([state.encode()], ancillary, 0, address)
        except OSError:
            return False
    return True


def store_fds(name: str, fds: Sequence[int]) -> bool:
    """Keep copies of ``fds`` in the service manager's fd store under ``name``
    (systemd with FileDescriptorStoreMax=, or `vmemdev hold`); a restarted
    process gets them back through listen_fds(). False when nobody keeps them."""
    return notify(f"FDSTORE=1\nFDNAME={name}", fds)


def same_file(a: int, b: int) -> bool:
    """Whether systemd's fd store takes ``a`` and ``b`` for one file, as its
    same_fd() does (``host.probes.same_file``: kcmp, or the inode without it)."""
    if a == b:
        return True
    from ..host.probes import same_file as probe  # the shim, loaded only when a store is kept

    return probe(a, b)


def listen_fds() -> dict[str, int]:
    """Sockets passed by systemd socket activation, by name (LISTEN_FDNAMES).

    Unnamed sockets are called "fd3", "fd4", ... The variables are removed
    so that child processes do not inherit them.
    """
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if os.environ.get("LISTEN_FDNAMES") else []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    out = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] and names[i] != "unknown" else f"fd{fd}"
        out[name] = fd
    return out


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald (JOURNAL_STREAM=dev:ino matches)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class TextFormatter(logging.Formatter):
    """``time vmemdev[instance] LEVEL logger: message``; journald gets ``<N>`` and no time."""

    def __init__(self, instance: str, journal: bool):
        super().__init__()
        self.instance = instance
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"vmemdev[{self.instance}] {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        return f"{self.formatTime(record)} {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def __init__(self, instance: str):
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "instance": self.instance,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup_logging(level: str, instance: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(instance))
    else:
        handler.setFormatter(TextFormatter(instance, stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
