"""`vmemdev hold -- COMMAND...`: keep a worker's fds across its death and restart it.

A minimal stand-in for the part of systemd's service manager that lets a
service survive its own crash: the worker stores fds with sd_notify
(``FDSTORE=1`` and ``FDNAME=NAME``, ``FDSTOREREMOVE=1``; the systemd.service
file descriptor store), and when it dies of anything but a clean exit the
holder starts it again with those fds, as systemd passes them:
``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID``, fds from 3 up. Like
systemd (same_fd() in its fd store), it keeps one fd per open file: an fd of
a file it holds already is closed, not stored, whatever its name; and a
name stored again adds an fd, it does not replace the first.

The holder is the process that must not die, so it does as little as
possible: it reads only its own worker's notify datagrams (a socket in a
private directory), never anything from a guest or a front-end. A clean exit
of the worker (status 0) ends the holder, and so does status 2 (a usage or
state error a restart cannot fix); SIGTERM and SIGINT are passed on to the
worker, which then exits cleanly.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .systemd import same_file

log = logging.getLogger(__name__)

MAX_STORED = 64  # like FileDescriptorStoreMax=
FIRST_DELAY, MAX_DELAY = 0.1, 5.0  # restart back-off, doubling
STABLE = 10.0  # a worker that ran this long resets the back-off
USAGE_ERROR = 2  # as RestartPreventExitStatus=2 in the systemd unit
_FD_BASE = 1000  # stored fds are moved above this in the child before dup2 to 3...


@dataclass
class FdStore:
    """fds by name, in the order they were stored."""

    max_fds: int = MAX_STORED
    entries: list[tuple[str, int]] = field(default_factory=list)

    def store(self, name: str, fds: Sequence[int]) -> None:
        """As systemd's store: an fd of a new file is added, even under a name
        already stored (FDSTOREREMOVE=1 removes the old ones)."""
        for fd in fds:
            kept = next((n for n, f in self.entries if same_file(f, fd)), None)
            if kept is not None:  # as systemd: one fd per open file, whatever its name
                log.debug("fd for %r is a file already stored as %r: closed, not kept", name, kept)
                os.close(fd)
            elif len(self.entries) >= self.max_fds:
                log.error("fd store full (%d): fd for %r closed, not kept", self.max_fds, name)
                os.close(fd)
            else:
                self.entries.append((name, fd))

    def remove(self, name: str) -> None:
        for _, fd in [e for e in self.entries if e[0] == name]:
            os.close(fd)
        self.entries = [e for e in self.entries if e[0] != name]

    def close(self) -> None:
        for _, fd in self.entries:
            os.close(fd)
        self.entries = []


def handle_notify(store: FdStore, data: bytes, fds: list[int]) -> bool:
    """Apply one sd_notify datagram; True on READY=1. fds not stored are closed."""
    fields = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    name = fields.get("FDNAME", "stored")
    valid_name = 0 < len(name) <= 255 and ":" not in name and name.isprintable()
    if fields.get("FDSTORE") == "1" and fds and valid_name:
        store.store(name, fds)
        log.debug("stored %d fd(s) as %r", len(fds), name)
        fds = []
    elif fields.get("FDSTOREREMOVE") == "1" and valid_name:
        store.remove(name)
    for fd in fds:
        os.close(fd)
    if "STATUS" in fields:
        log.info("worker status: %s", fields["STATUS"])
    return fields.get("READY") == "1"


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(MAX_STORED * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


class Holder:
    def __init__(self, command: Sequence[str], store: FdStore | None = None, max_delay: float = MAX_DELAY):
        self.command = list(command)
        self.max_delay = max_delay
        self.store = store or FdStore()
        self.directory = tempfile.mkdtemp(prefix="vmemdev-hold-")  # 0700: only we can reach it
        self.notify_path = os.path.join(self.directory, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(self.notify_path)
        self.worker: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restarts = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        entries = self.store.entries[::-1]  # as systemd 252 hands them: the newest first
        stored = [fd for _, fd in entries]
        names = ":".join(name for name, _ in entries)
        notify = self.notify_path

        def hand_over() -> None:  # in the child, before exec
            moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, _FD_BASE) for fd in stored]
            for i, fd in enumerate(moved):  # the stored fds become 3, 4, ...
                os.dup2(fd, 3 + i)
            os.environ["NOTIFY_SOCKET"] = notify  # exec passes the child's own environ
            for var in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
                os.environ.pop(var, None)
            if stored:
                os.environ.update(LISTEN_FDS=str(len(stored)), LISTEN_FDNAMES=names,
                                  LISTEN_PID=str(os.getpid()))

        return subprocess.Popen(self.command, pass_fds=tuple(range(3, 3 + len(stored))),
                                preexec_fn=hand_over)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signum)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        delay = FIRST_DELAY
        try:
            while True:
                started = time.monotonic()
                self.worker = self._spawn()
                log.info("worker %d started (%d fds handed over)", self.worker.pid, len(self.store.entries))
                status = self._wait(self.worker)
                if status == 0 or self.stopping:
                    log.info("worker %d exited with status %d; done", self.worker.pid, status)
                    return 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else 1
                if status == USAGE_ERROR:  # a restart cannot fix a bad option or a bad state
                    log.error("worker %d exited with status 2 (usage or state error): not restarted",
                              self.worker.pid)
                    return USAGE_ERROR
                self.restarts += 1
                delay = FIRST_DELAY if time.monotonic() - started > STABLE else min(delay * 2, self.max_delay)
                log.error("worker %d died (%s); restarting it in %.1f s with %d stored fds",
                          self.worker.pid, _describe(status), delay, len(self.store.entries))
                deadline = time.monotonic() + delay
                while not self.stopping and time.monotonic() < deadline:
                    self._pump(deadline - time.monotonic())
                if self.stopping:
                    return 0
        finally:
            self.store.close()
            self.notify.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def _wait(self, worker: subprocess.Popen[bytes]) -> int:
        while (status := worker.poll()) is None:
            self._pump(0.1)
        self._pump(0)  # what it stored just before it died
        return status

    def _pump(self, timeout: float) -> None:
        try:
            readable, _, _ = select.select([self.notify], [], [], max(timeout, 0))
        except InterruptedError:
            return
        while readable:
            try:
                data, fds = _receive(self.notify)
            except BlockingIOError:
                return
            handle_notify(self.store, data, fds)
            readable, _, _ = select.select([self.notify], [], [], 0)


def _describe(status: int) -> str:
    if status < 0:
        return f"signal {signal.Signals(-status).name}"
    return f"exit status {status}"
