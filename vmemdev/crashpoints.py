"""Crash points: die as kill -9 would at a named instant, for the tests that
kill the serving process at each step of a request (``VMEMDEV_CRASH_POINT``).

Points: ``answer-saved`` (the answer decided and saved, not yet in the used
ring), ``host-work-done`` (a PLUG's populate or an UNPLUG's discard
done, the device's state not yet changed or saved), and inside a request's
save in the state file's device record (``daemon/devrecord.py``):
``record-payload`` (a slot's payload written, not its crc) and
``record-crc`` (the slot complete, its bitmap bytes not yet copied). In a
vhost-user message (``daemon/inflight.py``): ``message-applied`` (handled
and saved, still on the socket), ``reply-owed`` (its reply kept, the
message still on the socket) and ``message-consumed`` (taken off, the
reply not sent).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
_WANTED = os.environ.get("VMEMDEV_CRASH_POINT", "")  # read once: set when the process starts


def crash_points_armed() -> bool:
    """Whether any crash point may fire in this process (a test asked for
    one): code that does several steps in one call then does them one by one."""
    return bool(_WANTED)


def crash_point(name: str) -> None:
    """Die here, as kill -9 would, if $VMEMDEV_CRASH_POINT is "POINTS:MARKER"
    (POINTS: a name, several separated by commas, or "*" for all) and the
    marker does not exist yet; it is created first: one crash, not a loop.
    When MARKER is a directory the marker is MARKER/NAME, so a test arms a
    point again by removing its file."""
    if not _WANTED:  # the usual case, on every request: nothing more
        return
    points, _, marker = _WANTED.partition(":")
    if not marker or (points != "*" and name not in points.split(",")):
        return
    if os.path.isdir(marker):
        marker = os.path.join(marker, name)
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    log.warning("crash point %s: dying as kill -9 would", name)
    os.kill(os.getpid(), signal.SIGKILL)
