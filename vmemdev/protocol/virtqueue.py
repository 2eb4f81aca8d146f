"""Split virtqueue (virtio 1.x, little-endian), device side, sans-IO.

Layouts, with ``num`` entries::

    desc[num]   { le64 addr; le32 len; le16 flags; le16 next; }   16 bytes each
    avail       { le16 flags; le16 idx; le16 ring[num]; le16 used_event; }
    used        { le16 flags; le16 idx; { le32 id; le32 len; }[num]; le16 avail_event; }

Everything read from these areas is written by the guest and untrusted: the
walker bounds every chain by ``num`` steps, checks heads and next indices,
requires readable descriptors before writable ones and refuses indirect
descriptors (VIRTIO_F_INDIRECT_DESC is not offered). Ring areas are given as
(buffer, offset) pairs into the mapped guest memory so no buffer export is
held across memory-table changes.

Ordering (virtio 1.x, 2.7.13): the driver and the device run concurrently on
other CPUs. avail.idx is read with one 16-bit acquire load, so the ring entry
and the descriptors read after it are at least as new as the index; the
response is written into the guest's buffers, then the used element, then
used.idx with one 16-bit release store, so a driver that sees the new index
sees the whole element and never a half-written index. Python promises
neither a single store nor a barrier (``struct.pack_into`` zero-fills its
target first), so those accesses go through a ``RingAccess`` (the host
layer's does them in the C shim). Descriptor fields are read once into
Python values and checked; a torn read of a descriptor the driver is still
changing gives a value that is bounds-checked like any other.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import construct as cs

from ..errors import PeerError

# Readable definitions; the hot path below uses the precompiled structs.
DescStruct = cs.Struct("addr" / cs.Int64ul, "len" / cs.Int32ul, "flags" / cs.Int16ul, "next" / cs.Int16ul)
UsedElemStruct = cs.Struct("id" / cs.Int32ul, "len" / cs.Int32ul)

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

MAX_QUEUE_SIZE = 32768


def desc_table_size(num: int) -> int:
    return DESC.size * num


def avail_ring_size(num: int) -> int:
    return 4 + 2 * num + 2


def used_ring_size(num: int) -> int:
    return 4 + USED_ELEM.size * num + 2


def valid_queue_size(num: int) -> bool:
    """Split rings need a power-of-two size between 1 and 32768."""
    return 0 < num <= MAX_QUEUE_SIZE and num & (num - 1) == 0


@dataclass(frozen=True)
class Buffer:
    """One descriptor: guest-physical address, length, device-writable."""

    addr: int
    length: int
    writable: bool


@dataclass(frozen=True)
class Chain:
    head: int
    readable: tuple[Buffer, ...]
    writable: tuple[Buffer, ...]


class RingBroken(PeerError):
    """The ring itself is inconsistent; processing must stop until restart."""


class ChainError(PeerError):
    """One descriptor chain is malformed; its head can still be returned."""

    def __init__(self, head: int, reason: str):
        self.head = head
        super().__init__(f"descriptor chain at head {head}: {reason}")


class Area(NamedTuple):
    """A ring area in mapped guest memory. No buffer export is held, so the
    mapping can be closed when QEMU removes the region."""

    buf: mmap.mmap
    offset: int
    address: int  # our virtual address of buf[offset]


class RingAccess(Protocol):
    """The accesses a guest may race with: single, ordered loads and stores."""

    def load_acquire_u16(self, address: int) -> int: ...

    def publish_used(self, elem_address: int, head: int, written: int, idx_address: int, idx: int) -> None: ...


class SplitQueue:
    """Device-side view of one split virtqueue."""

    def __init__(
        self,
        num: int,
        desc: Area,
        avail: Area,
        used: Area,
        access: RingAccess,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
    ):
        if not valid_queue_size(num):
            raise PeerError(f"queue size {num} is not a power of two in 1..32768")
        # The spec's alignments (2.7.10.1); what makes the index accesses single.
        for name, area, align in (("descriptor table", desc, 16), ("avail ring", avail, 2),
                                  ("used ring", used, 4)):
            if area.address % align:
                raise PeerError(f"{name} at {area.address:#x} is not {align}-byte aligned")
        self.num = num
        self._access = access
        self._desc_buf, self._desc_off = desc.buf, desc.offset
        self._avail_buf, self._avail_off = avail.buf, avail.offset
        self._avail_idx_address = avail.address + 2
        self._used_idx_address = used.address + 2
        self._used_ring_address = used.address + 4
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # After SET_VRING_BASE the used index equals the avail index we resume at.
        self.used_idx = (self.last_avail_idx if used_idx is None else used_idx) & 0xFFFF

    def avail_idx(self) -> int:
        return self._access.load_acquire_u16(self._avail_idx_address)

    def pending(self) -> int:
        """How many chains the driver has made available that we have not taken."""
        pending = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if pending > self.num:
            raise RingBroken(
                f"avail.idx is {pending} entries ahead of last_avail_idx "
                f"{self.last_avail_idx}, more than the queue size {self.num}"
            )
        return pending

    def pop_head(self) -> int | None:
        """Take the next available head, or None when the ring is empty."""
        if not self.pending():
            return None
        slot = self.last_avail_idx % self.num
        head: int = U16.unpack_from(self._avail_buf, self._avail_off + 4 + 2 * slot)[0]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head >= self.num:
            raise RingBroken(f"avail ring slot {slot} names head {head} >= queue size {self.num}")
        return head

    def read_chain(self, head: int, check: Callable[[int, int], None]) -> Chain:
        """Walk the chain at ``head``; ``check(addr, length)`` validates each buffer."""
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        index = head
        for _ in range(self.num):
            addr, length, flags, nxt = DESC.unpack_from(
                self._desc_buf, self._desc_off + DESC.size * index
            )
            if flags & DESC_F_INDIRECT:
                raise ChainError(head, "indirect descriptor, but INDIRECT_DESC was not offered")
            buf = Buffer(addr, length, bool(flags & DESC_F_WRITE))
            if buf.writable:
                writable.append(buf)
            elif writable:
                raise ChainError(head, f"readable descriptor {index} after a writable one")
            else:
                readable.append(buf)
            try:
                check(addr, length)
            except PeerError as exc:
                raise ChainError(head, f"descriptor {index}: {exc}") from exc
            if not flags & DESC_F_NEXT:
                return Chain(head, tuple(readable), tuple(writable))
            if nxt >= self.num:
                raise ChainError(head, f"descriptor {index} links to {nxt} >= queue size")
            index = nxt
        raise ChainError(head, f"chain longer than the queue size {self.num} (a loop?)")

    def push_used(self, head: int, written: int) -> None:
        """Publish one used element: the element, then used.idx (see the module doc)."""
        elem = self._used_ring_address + USED_ELEM.size * (self.used_idx % self.num)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._access.publish_used(elem, head, written, self._used_idx_address, self.used_idx)
