"""The device's per-request state, in a small fixed-layout file mapped shared.

``serve --state-file PATH`` keeps the connection's negotiated state in PATH
(JSON, written on vhost-user messages, ``keeper.py``) and the part that a
guest request changes in ``PATH.dev``: the block bitmap, requested and usable
size, and the answer to the last request that changed them. That part is
saved before every state-changing answer, so it must cost microseconds, not
a file write and a rename: the file is mapped ``MAP_SHARED`` and a save is a
few stores into the mapping. A store into a shared file mapping is in the
page cache as soon as it is made, so it survives the death of the process
at any instant (kill -9, OOM kill, a crash); a crash of the host kills the
VM too, so nothing is flushed to disk.

Layout (little-endian; format ``FORMAT``)::

    0      header: magic, format, id, geometry, layout, crc32 of the header
    512    slot 0   (SLOT_SIZE = 1792 bytes)
    2304   slot 1
    4096   the bitmap, one bit per block, as the model keeps it

    slot: crc32 | seq | requested | usable | window first, length, kind |
          answer? | ring | head | used_idx | request length | response length |
          request | response | window bytes

A save (``DeviceRecordFile.answer``) writes the slot that does not hold the newest record: its payload
(seq = newest + 1, the sizes, the answer, and the bitmap bytes the change
touched, the "window"), then its crc32 (of the whole payload, seq included),
and only then copies the window into the bitmap. So at every instant:

- payload being written: the slot's old crc does not match it; the other
  slot is the newest valid record, and the bitmap is exactly its state;
- crc written, window being copied: the slot is valid and the newest; the
  reader copies its window again (the same bytes: idempotent);
- done: the same, with nothing left to copy.

The reader takes the valid slot with the highest seq and applies its window
to the bitmap it read. A request's window costs the bytes of its range,
however large the region: a Linux guest plugs and unplugs at most a memory
block (128 MiB) per request, 64 blocks of 2 MiB, 8 bytes. A window of zeros
(UNPLUG_ALL: "zeros over the bytes ever set"; a large UNPLUG) is stored as a
length. A window of more than ~1.7 KiB of other bytes (a single PLUG of
more than ~13,000 blocks, 27 GiB at 2 MiB) does not fit a slot: that save
writes the whole file anew and renames it over the old one (the bitmap's
size: 64 KiB for 1 TiB at 2 MiB, 1 MiB for 16 TiB).

The id pairs this file with the JSON state that names it; the geometry in
the header must be the device's. A file that is truncated, foreign, of
another format or geometry, or with no valid slot is refused (StateError,
naming the file).
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..vhost.snapshot import StateError
from ..virtio_mem.model import DeviceRecord

FORMAT = 2  # the state format this file belongs to (PATH's JSON has the same number)
MAGIC = b"vmemdev-devstate"
HEADER = struct.Struct("<16sIIQQQQQIIQQ")  # magic, format, header size, id, addr, region, block, nblocks,
#                                             slot size, slot count, bitmap offset, bitmap length; then crc32
HEADER_SIZE = 512
SLOT_SIZE = 1792  # the header and both slots share the first page: a save touches it and the bitmap's
SLOTS = 2
CRC = struct.Struct("<I")
# seq, requested, usable, window first, window length, window kind, has answer, ring, head, used_idx,
# request length, response length
SLOT = struct.Struct("<QQQQQBBHHHHH")
SLOT_ROOM = SLOT_SIZE - CRC.size - SLOT.size  # for request + response + window bytes
NO_WINDOW, WINDOW_BYTES, WINDOW_ZEROS = 0, 1, 2
BITMAP_OFFSET = HEADER_SIZE + SLOTS * SLOT_SIZE
_pack_slot, _pack_crc, _crc32 = SLOT.pack, CRC.pack, zlib.crc32  # the per-request path's
_SLOT_OFFSETS = tuple(HEADER_SIZE + i * SLOT_SIZE for i in range(SLOTS))


@dataclass(frozen=True)
class DeviceState:
    """What a device record file holds (the newest valid slot applied)."""

    id: int
    geometry: tuple[int, int, int]  # addr, region size, block size
    requested_size: int
    usable_region_size: int
    bitmap: bytes
    answer: tuple[int, int, bytes, bytes, int] | None  # ring, head, request, response, used_idx
    seq: int


def bitmap_length(nblocks: int) -> int:
    return (nblocks + 7) // 8


def _slot_bytes(seq: int, requested: int, usable: int, first: int, length: int, kind: int,
                window: bytes, answer: tuple[int, int, bytes, bytes, int] | None) -> bytes:
    if answer is None:
        payload = SLOT.pack(seq, requested, usable, first, length, kind, 0, 0, 0, 0, 0, 0) + window
    else:
        ring, head, request, response, used_idx = answer
        payload = SLOT.pack(seq, requested, usable, first, length, kind, 1, ring, head, used_idx,
                            len(request), len(response)) + request + response + window
    return CRC.pack(zlib.crc32(payload)) + payload


def create(path: str, *, id: int, geometry: tuple[int, int, int], nblocks: int, requested: int, usable: int,
           bitmap: bytes, answer: tuple[int, int, bytes, bytes, int] | None, seq: int = 1,
           changes: int = -1) -> DeviceRecordFile:
    """Write a complete record file (PATH.new, then renamed over PATH) and map it.
    Every byte is written, so stores into the mapping never need a new page
    (a sparse file on a full tmpfs would SIGBUS). ``changes``: the device's
    ``DeviceRecord.changes`` this state is of (-1: unknown, the next request
    saves). Raises OSError."""
    if len(bitmap) != bitmap_length(nblocks):
        raise ValueError("bitmap length does not match the block count")
    addr, region, block = geometry
    header = HEADER.pack(MAGIC, FORMAT, HEADER_SIZE, id, addr, region, block, nblocks, SLOT_SIZE, SLOTS,
                         BITMAP_OFFSET, len(bitmap))
    header += CRC.pack(zlib.crc32(header))
    slot = _slot_bytes(seq, requested, usable, 0, 0, NO_WINDOW, b"", answer)
    if len(slot) > SLOT_SIZE:
        raise ValueError("the answer does not fit a slot")
    content = b"".join([header.ljust(HEADER_SIZE, b"\0"), slot.ljust(SLOT_SIZE, b"\0"), bytes(SLOT_SIZE),
                        bitmap])
    temporary = path + ".new"
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.rename(temporary, path)
        return DeviceRecordFile(path, fd, len(content), seq, 0, changes)
    finally:
        os.close(fd)


class DeviceRecordFile:
    """An open record file: ``answer`` is the per-request path."""

    def __init__(self, path: str, fd: int, size: int, seq: int, slot: int, changes: int):
        self.path = path
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.seq = seq  # of the newest record
        self._slot = slot  # where it is
        self.changes = changes  # the device's DeviceRecord.changes when the newest record was taken
        self.behind = False  # a change did not fit a slot: the file must be written anew
        self._crash: Callable[[str], None] | None = None  # crashpoints.crash_point, when the tests ask for one

    def answer(self, device: DeviceRecord, ring: int, head: int, request: bytes, response: bytes,
               used_idx: int) -> bool | None:
        """Record the device's state and this answer (ring -1: no answer) in
        the next slot, and the bitmap bytes that changed since the last record
        (``bitmap.take_window``). None: with an answer, nothing changed since
        the last record (``device.changes``), so nothing is written. False: the
        change does not fit a slot (or an earlier one did not); nothing is
        written, and the caller must write the file anew (``behind``). True:
        recorded."""
        if self.behind:
            return False
        changes = device.changes
        if ring >= 0 and changes == self.changes:
            return None
        touched = device.bitmap.take_window()
        requested, usable = device.requested_size, device.usable_region_size
        if touched is None:
            first = length = kind = 0  # NO_WINDOW
            data: bytes | bytearray = b""
        else:
            first, data = touched
            length = len(data)
            kind = WINDOW_BYTES
            if length > 64 and data.count(0) == length:  # UNPLUG_ALL: zeros over every byte ever set
                kind = WINDOW_ZEROS
                data = b""
        seq = self.seq + 1
        if ring < 0:
            crash = None  # the tests' crash points are on the request path only
            payload = _pack_slot(seq, requested, usable, first, length, kind, 0, 0, 0, 0, 0, 0) + data
        else:
            crash = self._crash
            payload = b"".join((_pack_slot(seq, requested, usable, first, length, kind, 1, ring, head, used_idx,
                                           len(request), len(response)), request, response, data))
        end = len(payload) + 4
        if end > SLOT_SIZE:
            self.behind = True  # the window is taken: only the whole file anew can catch up
            return False
        target = self._slot ^ 1
        offset = _SLOT_OFFSETS[target]
        m = self._map
        m[offset + 4:offset + end] = payload  # the payload; then its crc, last
        if crash is not None:
            crash("record-payload")
        m[offset:offset + 4] = _pack_crc(_crc32(payload))
        self.seq, self._slot, self.changes = seq, target, changes
        if kind:
            if crash is not None:
                crash("record-crc")
            start = BITMAP_OFFSET + first
            m[start:start + length] = data if kind == WINDOW_BYTES else bytes(length)
        return True

    def close(self) -> None:
        self._map.close()


def read(path: str) -> DeviceState:
    """Read a record file; raises StateError naming it and what is wrong."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as exc:
        raise StateError(f"{path}: cannot read the device record ({exc})") from exc
    try:
        return _parse(content)
    except ValueError as exc:
        raise StateError(f"{path}: not a usable device record ({exc})") from exc


def _parse(content: bytes) -> DeviceState:
    if len(content) < HEADER.size + CRC.size:
        raise ValueError(f"truncated: {len(content)} bytes")
    fields = HEADER.unpack_from(content)
    magic, fmt, header_size, ident, addr, region, block, nblocks, slot_size, slots, bm_offset, bm_length = fields
    if magic != MAGIC:
        raise ValueError("not a vmemdev device record (bad magic)")
    (crc,) = CRC.unpack_from(content, HEADER.size)
    if crc != zlib.crc32(content[:HEADER.size]):
        raise ValueError("header checksum mismatch")
    if fmt != FORMAT:
        raise ValueError(f"format {fmt}; this version reads {FORMAT}")
    if (header_size, slot_size, slots, bm_offset) != (HEADER_SIZE, SLOT_SIZE, SLOTS, BITMAP_OFFSET) \
            or bm_length != bitmap_length(nblocks):
        raise ValueError("unexpected layout")
    if len(content) != bm_offset + bm_length:
        raise ValueError(f"truncated or padded: {len(content)} bytes, expected {bm_offset + bm_length}")
    best = None
    for index in range(SLOTS):
        record = _slot(content, HEADER_SIZE + index * SLOT_SIZE, bm_length)
        if record is not None and (best is None or record[0] > best[0]):
            best = record
    if best is None:
        raise ValueError("no valid record in either slot")
    seq, requested, usable, first, length, kind, window, answer = best
    bitmap = bytearray(content[bm_offset:])
    if kind == WINDOW_BYTES:
        bitmap[first:first + length] = window
    elif kind == WINDOW_ZEROS:
        bitmap[first:first + length] = bytes(length)
    return DeviceState(ident, (addr, region, block), requested, usable, bytes(bitmap), answer, seq)


def _slot(content: bytes, offset: int, bm_length: int) -> tuple[Any, ...] | None:
    """The record a slot holds, or None if it is empty or torn."""
    (crc,) = CRC.unpack_from(content, offset)
    start = offset + CRC.size
    seq, requested, usable, first, length, kind, has_answer, ring, head, used_idx, req_len, resp_len = \
        SLOT.unpack_from(content, start)
    if seq == 0 or kind not in (NO_WINDOW, WINDOW_BYTES, WINDOW_ZEROS) or has_answer not in (0, 1):
        return None
    if kind == NO_WINDOW and (first or length):
        return None
    if first + length > bm_length:
        return None
    variable = req_len + resp_len + (length if kind == WINDOW_BYTES else 0)
    if variable > SLOT_ROOM or (not has_answer and (req_len or resp_len)):
        return None
    end = start + SLOT.size + variable
    if crc != zlib.crc32(content[start:end]):
        return None
    body = start + SLOT.size
    answer = None
    if has_answer:
        request = content[body:body + req_len]
        response = content[body + req_len:body + req_len + resp_len]
        answer = (ring, head, request, response, used_idx)
    window = content[body + req_len + resp_len:end] if kind == WINDOW_BYTES else b""
    return seq, requested, usable, first, length, kind, window, answer
