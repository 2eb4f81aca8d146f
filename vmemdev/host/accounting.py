"""The honest account of a device's host memory.

- plugged: what the guest was given (blocks × block size);
- allocated: what the host really holds for the device region, from the
  backing file (st_blocks when the region is the whole file, else the
  SEEK_DATA extents inside it). Never RSS: a process's RSS drops on
  MADV_DONTNEED although nothing was freed;
- outside plugged: allocated bytes in unplugged blocks (must be 0);
- memmap estimate: Linux keeps a 64-byte struct page per 4 KiB page, 2 MiB
  per 128 MiB memory block that has any plugged block. Without
  memmap_on_memory (Linux 7.2's virtio_mem) it comes out of the guest's
  boot memory; with it, out of the plugged range itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import native
from ..virtio_mem.model import VirtioMemDevice
from .memory import Backing

LINUX_MEMORY_BLOCK = 128 << 20
MEMMAP_PER_MEMORY_BLOCK = LINUX_MEMORY_BLOCK // 64


@dataclass(frozen=True)
class Footprint:
    allocated: int  # bytes the host holds for the device region
    extents: tuple[tuple[int, int], ...]  # (gpa, length) with data (SEEK_DATA)
    outside_plugged: int  # extent bytes in unplugged blocks


def piece_allocated(piece: Backing) -> int:
    """Allocated bytes of one backing piece."""
    st = os.fstat(piece.fd)
    if piece.file_offset == 0 and piece.length == st.st_size:
        return st.st_blocks * 512  # counts fallocate()d pages that SEEK_DATA skips
    return sum(length for _, length in native.data_extents(piece.fd, piece.file_offset,
                                                            piece.file_offset + piece.length))


def footprint(device: VirtioMemDevice, pieces: list[Backing]) -> Footprint:
    extents = []
    allocated = 0
    for piece in pieces:
        allocated += piece_allocated(piece)
        for off, length in native.data_extents(piece.fd, piece.file_offset, piece.file_offset + piece.length):
            extents.append((piece.gpa + off - piece.file_offset, length))
    outside = sum(length - plugged_overlap(device, gpa, length) for gpa, length in extents)
    return Footprint(allocated, tuple(extents), outside)


def plugged_overlap(device: VirtioMemDevice, gpa: int, length: int) -> int:
    """Bytes of [gpa, gpa + length) that lie in plugged blocks."""
    bs = device.block_size
    start = gpa - device.geometry.addr
    end = start + length
    first, last = start // bs, (end - 1) // bs
    if first == last:
        return length if device.bitmap.test(first) else 0
    total = device.bitmap.count_range(first + 1, last - first - 1) * bs
    if device.bitmap.test(first):
        total += (first + 1) * bs - start
    if device.bitmap.test(last):
        total += end - last * bs
    return total


def memmap_estimate(device: VirtioMemDevice) -> dict:
    """Guest memmap cost of what is plugged, per Linux memory block used."""
    g = device.geometry
    bs = device.block_size
    used = 0
    # Linux memory blocks are aligned to 128 MiB in guest-physical space.
    block = g.addr - g.addr % LINUX_MEMORY_BLOCK
    end = g.addr + g.region_size
    while block < end:
        lo = max(block, g.addr)
        hi = min(block + LINUX_MEMORY_BLOCK, end)
        first = (lo - g.addr) // bs
        count = -(-(hi - g.addr) // bs) - first
        if device.bitmap.count_range(first, count):
            used += 1
        block += LINUX_MEMORY_BLOCK
    memmap = used * MEMMAP_PER_MEMORY_BLOCK
    plugged = device.plugged_size
    return {
        "linux_memory_blocks_used": used,
        "memmap_bytes": memmap,
        # Linux 7.2 virtio_mem: memmap from boot memory; the guest gains all it plugged.
        "without_memmap_on_memory": {"guest_gain": plugged, "boot_memory_cost": memmap},
        # With memmap_on_memory the memmap lives inside the plugged range.
        "with_memmap_on_memory": {"guest_gain": max(plugged - memmap, 0), "boot_memory_cost": 0},
    }
