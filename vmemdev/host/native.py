"""The one native façade: every raw memory syscall vmemdev makes goes through here,
and the vhost-user message path's socket calls and journal stores (at the end).

Why it exists:

- cffi releases the GIL for the length of a call, so a 1 GiB punch or
  populate run in a worker thread leaves the Trio loop (and every other
  thread) running. The stdlib ``mmap.madvise`` holds the GIL: a 1 GiB
  populate through it froze every other Python thread.
- One place converts the shim's -errno into :class:`NativeError` carrying the
  range, and checks arguments before they reach the kernel (``ValueError``
  for negative values, overflow, or a misaligned address).
- It is the only importer of ``vmemdev.host._native``: no cffi object or exception
  leaks into the rest of the package.
- Tests can make any discard/populate fail on demand (:func:`inject_fault`).

Every call blocks: the daemon runs long ranges on a worker thread and never
abandons one on cancel, so what the device model believes and what the host
really holds cannot diverge.
"""

from __future__ import annotations

import contextlib
import mmap
import operator
import threading
from collections.abc import Callable, Iterable, Iterator
from errno import E2BIG
from typing import Any

from ..errors import NativeError
from ._native import ffi, lib

__all__ = [
    "PAGE_SIZE",
    "punch_hole",
    "punch_ranges",
    "madv_remove",
    "populate_write",
    "fallocate",
    "allocated_bytes",
    "same_file",
    "data_extents",
    "resident_pages",
    "buffer_address",
    "inject_fault",
    "load_acquire_u16",
    "publish_used",
    "MessageIo",
    "keep_reply",
    "JournalMap",
    "MSG_KEEP",
    "MSG_CONSUME",
    "MSG_SEND",
    "MSG_ALL",
]

PAGE_SIZE = mmap.PAGESIZE
_OFF_MAX = 2**63 - 1  # file offsets are off_t
_ADDR_MAX = 2**64 - 1


# -- argument checks ---------------------------------------------------------


def _uint(name: str, value: int) -> int:
    value = operator.index(value)  # TypeError for floats, str...
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _file_range(offset: int, length: int) -> tuple[int, int]:
    offset, length = _uint("offset", offset), _uint("length", length)
    if offset + length > _OFF_MAX:
        raise ValueError(f"file range {offset:#x}+{length:#x} overflows off_t")
    return offset, length


def _addr_range(addr: int, length: int, *, whole_pages: bool) -> tuple[int, int]:
    addr, length = _uint("addr", addr), _uint("length", length)
    if addr + length > _ADDR_MAX:
        raise ValueError(f"address range {addr:#x}+{length:#x} overflows")
    if addr % PAGE_SIZE:
        raise ValueError(f"address {addr:#x} is not page-aligned")
    # The kernel rounds a length up to whole pages: for a discard that would
    # silently free memory the caller did not name.
    if whole_pages and length % PAGE_SIZE:
        raise ValueError(f"length {length:#x} is not a whole number of pages")
    return addr, length


# -- fault injection (tests) -------------------------------------------------

_FAULT_OPS = frozenset({"punch", "populate", "fallocate", "madv_remove"})
_faults: dict[str, list[int]] = {}  # op -> [errno, remaining uses]
_faults_lock = threading.Lock()  # async variants check from worker threads


@contextlib.contextmanager
def inject_fault(op: str, errno: int, count: int = 1) -> Iterator[None]:
    """For tests: make the next ``count`` calls of ``op`` fail with ``errno``.

    ``op`` is "punch" (punch_hole, punch_ranges), "populate", "fallocate" or
    "madv_remove". The call raises the same NativeError a real failure would,
    after argument checks and before any syscall, so nothing is changed.
    Leaving the block removes whatever is left of the fault.
    """
    if op not in _FAULT_OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_FAULT_OPS)}")
    with _faults_lock:
        previous = _faults.get(op)
        _faults[op] = [errno, count]
    try:
        yield
    finally:
        with _faults_lock:
            if previous is None:
                _faults.pop(op, None)
            else:
                _faults[op] = previous


def _injected(op: str) -> int:
    """The errno to fail ``op`` with, consuming one use; 0 when none."""
    if not _faults:  # the common case: no lock taken
        return 0
    with _faults_lock:
        fault = _faults.get(op)
        if fault is None or fault[1] <= 0:
            return 0
        fault[1] -= 1
        return fault[0]


def _raise_if_failed(op: str, rc: int, offset: int, length: int) -> None:
    if rc < 0:
        raise NativeError(op, -rc, offset, length)


def _maybe_inject(op: str, offset: int, length: int) -> None:
    if length and (err := _injected(op)):
        raise NativeError(op, err, offset, length)


# -- synchronous calls (short ranges, or already in a worker thread) ---------


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``length`` bytes of the file at ``offset``; the size is kept."""
    offset, length = _file_range(offset, length)
    _maybe_inject("punch", offset, length)
    _raise_if_failed("punch", lib.vmem_punch_hole(fd, offset, length), offset, length)


def punch_ranges(fd: int, ranges: Iterable[tuple[int, int]]) -> None:
    """Punch many (offset, length) ranges in one C call.

    Ranges that touch (the next starts where the previous ends) are merged
    into one syscall, so pass them sorted. All ranges are checked before any
    is punched. On failure the NativeError names the failing merged range and
    has ``done``: how many input ranges were fully punched before it.
    """
    flat: list[int] = []
    for offset, length in ranges:
        flat.extend(_file_range(offset, length))
    n = len(flat) // 2
    if n == 0:
        return
    done = ffi.new("size_t *")
    if err := _injected("punch"):
        rc = -err
    else:
        rc = lib.vmem_punch_ranges(fd, ffi.new("uint64_t[]", flat), n, done)
    if rc < 0:
        i = done[0]
        start = end = flat[2 * i]
        while i < n and flat[2 * i] == end:  # the run the C code merged
            end += flat[2 * i + 1]
            i += 1
        exc = NativeError("punch", -rc, start, end - start)
        exc.done = done[0]
        raise exc


def madv_remove(addr: int, length: int) -> None:
    """Free the backing pages of a shared mapping (MADV_REMOVE).

    Unlike MADV_DONTNEED, which on a shared mapping only drops this
    process's page tables and frees nothing.
    """
    addr, length = _addr_range(addr, length, whole_pages=True)
    _maybe_inject("madv_remove", addr, length)
    _raise_if_failed("madv_remove", lib.vmem_madv_remove(addr, length), addr, length)


def populate_write(addr: int, length: int) -> None:
    """Allocate and map the pages writable (MADV_POPULATE_WRITE)."""
    addr, length = _addr_range(addr, length, whole_pages=False)
    _maybe_inject("populate", addr, length)
    _raise_if_failed("populate", lib.vmem_populate_write(addr, length), addr, length)


def fallocate(fd: int, offset: int, length: int) -> None:
    """Allocate the file's pages (fallocate mode 0; shmem zeroes on touch)."""
    offset, length = _file_range(offset, length)
    _maybe_inject("fallocate", offset, length)
    _raise_if_failed("fallocate", lib.vmem_fallocate(fd, offset, length), offset, length)


def allocated_bytes(fd: int) -> int:
    """Bytes the file really holds (st_blocks × 512): the ground truth."""
    rc = lib.vmem_allocated_bytes(fd)
    _raise_if_failed("fstat", rc, 0, 0)
    return int(rc)


def same_file(a: int, b: int) -> bool:
    """Whether fds ``a`` and ``b`` share one open file description (kcmp(2)
    KCMP_FILE): what a dup() or a second SCM_RIGHTS copy of one fd gives.
    Raises NativeError (ENOSYS on a kernel without kcmp)."""
    rc = lib.vmem_same_file(_uint("fd", a), _uint("fd", b))
    _raise_if_failed("kcmp", rc, 0, 0)
    return bool(rc)


def data_extents(fd: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Allocated (offset, length) extents of the file within [start, end).

    Walks SEEK_DATA/SEEK_HOLE; moves the fd's file position. On shmem, pages
    fallocated but never touched count as holes here (they are not uptodate)
    although ``allocated_bytes`` includes them.
    """
    start = _uint("start", start)
    end = _OFF_MAX if end is None else _uint("end", end)
    if end < start or end > _OFF_MAX:
        raise ValueError(f"bad window [{start:#x}, {end:#x})")
    extents: list[tuple[int, int]] = []
    cap = 64
    n_out = ffi.new("size_t *")
    while True:
        buf = ffi.new("uint64_t[]", 2 * cap)
        rc = lib.vmem_data_extents(fd, start, end, buf, cap, n_out)
        flat = ffi.unpack(buf, 2 * n_out[0])
        extents.extend(zip(flat[::2], flat[1::2]))
        if rc != -E2BIG:
            break
        start = flat[-2] + flat[-1]  # buffer full: carry on after the last one
        cap *= 4
    _raise_if_failed("seek_data", rc, start, end - start)
    return extents


def resident_pages(addr: int, length: int) -> int:
    """How many pages of [addr, addr + length) are resident (mincore).

    On a shared file mapping this says whether the file page exists, not
    whether this process maps it.
    """
    addr, length = _addr_range(addr, length, whole_pages=False)
    out = ffi.new("uint64_t *")
    _raise_if_failed("mincore", lib.vmem_mincore_resident(addr, length, out), addr, length)
    return int(out[0])


def buffer_address(buf: mmap.mmap | bytearray) -> int:
    """Address of a writable buffer such as an ``mmap.mmap``.

    The buffer export is released before returning, so the mmap can still be
    closed or resized; the address is valid only while it stays mapped.
    """
    cdata = ffi.from_buffer(buf, require_writable=True)
    try:
        return int(ffi.cast("uintptr_t", cdata))
    finally:
        ffi.release(cdata)


# -- ring indexes shared with a running guest (see protocol/virtqueue.py) -------
# Called per request: no argument checks beyond what cffi does (the addresses
# come from bounds-checked, aligned ring areas).


# The shim's functions themselves: a Python wrapper would double their cost.
load_acquire_u16: Callable[[int], int] = lib.vmem_load_acquire_u16
"""One aligned 16-bit load with acquire ordering."""
publish_used: Callable[[int, int, int, int, int], None] = lib.vmem_publish_used
"""The used element (address, id, len), then used.idx (address, value) in one 16-bit release store."""


# -- vhost-user messages, peeked and finished (daemon/vhost_wire.py) -------------
# A vCPU waits for every GET_CONFIG's reply: the peek, the journal's stores,
# the consume and the send are each one C call, with buffers made once per
# connection (vmemshim.h says what each call does).

MSG_KEEP: int = lib.VMEM_MSG_KEEP
MSG_CONSUME: int = lib.VMEM_MSG_CONSUME
MSG_SEND: int = lib.VMEM_MSG_SEND
MSG_ALL: int = lib.VMEM_MSG_ALL
JOURNAL_STEPS = {"idle": lib.VMEM_STEP_IDLE, "reply owed": lib.VMEM_STEP_OWED, "sending": lib.VMEM_STEP_SENDING}


class JournalMap:
    """The mapped journal of the message in flight, as the shim writes it
    (``pointer``). Holds the mapping exported until ``release`` (the mmap
    cannot be closed before)."""

    def __init__(self, mapping: mmap.mmap):
        self.pointer: Any = ffi.from_buffer("uint8_t[]", mapping, require_writable=True)

    def release(self) -> None:
        ffi.release(self.pointer)
        self.pointer = ffi.NULL


def keep_reply(journal: JournalMap, request: int, length: int, reply: bytes) -> None:
    """``vmem_msg_finish``'s first step alone: ``reply`` kept in the journal, step OWED."""
    lib.vmem_msg_finish(-1, journal.pointer, request, length, reply, len(reply), MSG_KEEP, ffi.NULL)


class MessageIo:
    """One connection's buffers for ``vmem_msg_peek`` and ``vmem_msg_finish``."""

    def __init__(self, size: int, max_fds: int):
        self.data = bytearray(size)  # what the last peek read
        self.size, self.max_fds = size, max_fds
        self._buf = ffi.from_buffer("uint8_t[]", self.data, require_writable=True)
        self._fds = ffi.new("int[]", max_fds)
        self._nfds = ffi.new("uint32_t *")
        self._consumed = ffi.new("uint32_t *")

    def peek(self, sock: int) -> int:
        """Bytes peeked into ``data``, or -errno; then ``fds()``."""
        n: int = lib.vmem_msg_peek(sock, self._buf, self.size, self._fds, self.max_fds, self._nfds)
        return n

    def fds(self) -> list[int] | None:
        """The fds the last peek gave (now the caller's); None: more than
        ``max_fds`` came (the shim closed them all)."""
        count = self._nfds[0]
        if not count:
            return []
        fds: list[int] | None = None if count > self.max_fds else ffi.unpack(self._fds, count)
        return fds

    def finish(self, sock: int, journal: Any, request: int, length: int, reply: bytes,
               steps: int = MSG_ALL) -> int:
        """``vmem_msg_finish`` (``journal``: a JournalMap's pointer, or None)."""
        rc: int = lib.vmem_msg_finish(sock, journal or ffi.NULL, request, length, reply, len(reply), steps,
                                      self._consumed)
        return rc

    @property
    def consumed(self) -> int:
        """What the last ``finish`` took off the socket."""
        return int(self._consumed[0])
