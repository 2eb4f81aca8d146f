"""An upgrade in place: the serving process becomes the installed version of
vmemdev by execve(2), keeping its pid and handing itself every fd of the
attached connection.

The fds go over as socket activation passes them (sd_listen_fds(3)): at 3,
4, ... with LISTEN_PID (the same pid: execve keeps it), LISTEN_FDS and
LISTEN_FDNAMES: ``vhost-user`` and the connection's fd store entries by
their names (``storedfds.py``), as a restart gets them. The new program resumes the connection
from them and the state file exactly as after a crash-restart, so QEMU sees
no close, and systemd and `vmemdev hold` see the same main pid.

The caller makes sure nothing is in flight (the connection's thread is
parked, the state saved) and that no other thread runs Python that could
use the fds being moved.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
from typing import NoReturn

import trio

from . import systemd

log = logging.getLogger(__name__)

HANDOVER_ENV = "VMEMDEV_HANDOVER"  # tells the new program why it has these fds
FIRST_FD = systemd.SD_LISTEN_FDS_START
EXEC_FAILED = 70  # EX_SOFTWARE: Restart=on-failure restarts it


async def preflight() -> dict:
    """The installed version's --print-capabilities, proving that it starts;
    raises OSError naming what failed. Nothing is changed."""
    command = program(["--print-capabilities"])
    try:
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    except OSError as exc:
        raise OSError(f"cannot run {' '.join(command)}: {exc}") from exc
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise OSError(f"the installed vmemdev does not start ({' '.join(command)} exited with "
                      f"{result.returncode}: {tail[0]})")
    try:
        found = json.loads(result.stdout)
        found["version"], found["state-formats"]
    except (ValueError, TypeError, KeyError) as exc:
        raise OSError(f"the installed vmemdev does not say which state formats it reads ({exc!r})") from exc
    return found


def program(argv: list[str]) -> list[str]:
    """The command line of the installed version, with this process's arguments."""
    return [sys.executable, "-m", "vmemdev", *argv]


def reexec(argv: list[str], fds: dict[str, int], reason: str = "upgrade") -> NoReturn:
    """Replace this process by ``program(argv)`` with ``fds`` inherited.

    The caller has checked that the program starts (``preflight``). Should
    execve fail anyway, this process exits: its fds 3.. are no longer its own,
    and the service manager's fd store restarts the device from the state."""
    names = list(fds)
    # Copies above every target number first, so that no move overwrites an fd
    # still to be moved.
    floor = FIRST_FD + len(names)
    copies = [fcntl.fcntl(fds[name], fcntl.F_DUPFD_CLOEXEC, floor) for name in names]
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(names)),
               LISTEN_FDNAMES=":".join(names), **{HANDOVER_ENV: reason})
    command = program(argv)
    log.warning("%s: re-executing %s with %d fds of the connection", reason, " ".join(command), len(names))
    for handler in logging.getLogger().handlers:
        handler.flush()
    systemd.notify("RELOADING=1\nSTATUS=re-executing for an upgrade")
    try:
        for i, copy in enumerate(copies):
            os.dup2(copy, FIRST_FD + i, inheritable=True)
        os.execve(command[0], command, env)
    except OSError as exc:
        log.critical("%s: execve failed (%s); exiting for the service manager to restart us", reason, exc)
        for handler in logging.getLogger().handlers:
            handler.flush()
    os._exit(EXEC_FAILED)
