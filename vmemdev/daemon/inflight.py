"""Which step of a vhost-user message the serving process had reached: the
journal of the message in flight, kept in PATH.msg beside the state file.

A message stays on the socket until it has been handled (``vhost_wire``
peeks it, then consumes it), so a successor finds the message the dead
process was handling; this file says what had been done with it. Steps, in
order (``connection.py``):

    APPLYING  a message that changes state is being applied and saved
    (saved)   the connection's state file holds its effect
    OWED      its reply is decided and kept here; the message not yet consumed
    (consumed)
    SENDING   the reply is being sent, or was: done
    IDLE      done (a message without a reply)

What a successor does (``settle``):

- IDLE: nothing; a message at the head of the socket is a new one.
- APPLYING: the message at the head is handled again as a re-delivery: the
  messages that change state are idempotent (a region removed twice is
  not an error then), so applying it to the old state or the new one
  gives the same result, and its reply is decided again.
- OWED: the front-end waits for this reply, so it has sent nothing since:
  if the message is still at the head, it is consumed; then the kept reply
  is sent.
- SENDING: taken as sent. Wrong only if the process died between this
  store and the kernel taking the reply (a few instructions); the other
  choice would send a second reply whenever QEMU had read the first. It
  stays the step after the send: nothing more is stored for a read-only
  message (GET_CONFIG is on a vCPU's path).

Layout (little-endian, mapped shared: every step is a few stores, which
survive the process at any instant): magic, the step, the message's
request and length, the reply's length and crc32, then the reply (whose
own header names the request and its size again). The step is stored last.
The message path's stores (OWED, then SENDING or IDLE) are made by the C
shim in the same call that consumes the message and sends the reply
(``vhost_wire.finish_message``); the layout and the steps' numbers are
``native/vmemshim.h``'s too (``tests/test_inflight.py`` holds them equal).
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

from ..host import messages
from ..protocol import vhost_user as vu
from ..vhost.snapshot import StateError

MAGIC = b"VMEMMSG1"
IDLE, APPLYING, OWED, SENDING = 0, 1, 2, 3
STEPS = {IDLE: "idle", APPLYING: "applying", OWED: "reply owed", SENDING: "sending"}
HEAD = struct.Struct("<8sIIIII")  # magic, step, request, length, reply length, crc
STEP = struct.Struct("<I")
STEP_AT = 8
MAX_REPLY = vu.HEADER.size + vu.MAX_PAYLOAD
SIZE = HEAD.size + MAX_REPLY


class InFlight:
    """The journal file, mapped; one writer: the serving thread."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                os.ftruncate(fd, SIZE)
                os.pwrite(fd, HEAD.pack(MAGIC, IDLE, 0, 0, 0, 0), 0)
            elif size != SIZE:
                raise StateError(f"{path}: {size} bytes, a message journal has {SIZE}")
            self._map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.shim = messages.JournalMap(self._map)  # what vhost_wire.finish_message writes through

    def read(self) -> tuple[int, int, int, bytes]:
        """(step, request, length, reply) as the last writer left them;
        raises StateError naming the file when it is not a journal."""
        magic, step, request, length, reply_len, crc = HEAD.unpack_from(self._map, 0)
        if magic != MAGIC:
            raise StateError(f"{self.path}: not a message journal (magic {magic!r})")
        if step not in STEPS:
            raise StateError(f"{self.path}: step {step} is not one of {sorted(STEPS)}")
        if step != OWED:
            return step, request, length, b""
        if reply_len > MAX_REPLY or not vu.HEADER.size <= length <= MAX_REPLY:
            raise StateError(f"{self.path}: lengths {length}/{reply_len} out of bounds")
        reply = bytes(self._map[HEAD.size:HEAD.size + reply_len])
        if zlib.crc32(reply) != crc:
            raise StateError(f"{self.path}: the kept reply fails its crc")
        if reply_len < vu.HEADER.size or vu.HEADER.unpack_from(reply) != (request, vu.REPLY_FLAGS,
                                                                          reply_len - vu.HEADER.size):
            raise StateError(f"{self.path}: the kept reply is not one to request {request}")
        return step, request, length, reply

    def applying(self) -> None:
        STEP.pack_into(self._map, STEP_AT, APPLYING)

    def owed(self, request: int, length: int, reply: bytes) -> None:
        """Keep ``reply`` to the message (``request``, ``length`` bytes) at the
        head: the reply, its fields, then the step, last (until then a
        successor sees the step before). The shim's store, as
        ``vhost_wire.finish_message`` does it on the message path."""
        messages.keep_reply(self.shim, request, length, reply)

    def sending(self) -> None:
        STEP.pack_into(self._map, STEP_AT, SENDING)

    def idle(self) -> None:
        STEP.pack_into(self._map, STEP_AT, IDLE)

    def close(self) -> None:
        self.shim.release()
        self._map.close()
