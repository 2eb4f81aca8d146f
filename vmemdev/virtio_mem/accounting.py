"""The honest account of a device's host memory.

- plugged: what the guest was given (blocks × block size);
- allocated: what the host really holds for the device region, from the
  backing file (see ``Host.allocated``). Never RSS: a process's RSS drops on
  MADV_DONTNEED although nothing was freed;
- outside plugged: allocated bytes in unplugged blocks (must be 0);
- memmap estimate: Linux keeps a 64-byte struct page per 4 KiB page, 2 MiB
  per 128 MiB memory block that has any plugged block. Without
  memmap_on_memory (Linux 7.2's virtio_mem) it comes out of the guest's
  boot memory; with it, out of the plugged range itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..host.interface import Backing, Host
from .model import VirtioMemModel

LINUX_MEMORY_BLOCK = 128 << 20  # Linux's memory block on x86-64 (sysfs block_size_bytes)
MEMMAP_PER_MEMORY_BLOCK = LINUX_MEMORY_BLOCK // 64


@dataclass(frozen=True)
class Footprint:
    allocated: int  # bytes the host holds for the device region
    extents: tuple[tuple[int, int], ...]  # (gpa, length) with data (SEEK_DATA)
    outside_plugged: int  # extent bytes in unplugged blocks


def footprint(model: VirtioMemModel, host: Host, pieces: Sequence[Backing]) -> Footprint:
    """Raises OSError when the host cannot be read."""
    allocated = 0
    extents: list[tuple[int, int]] = []
    for piece in pieces:
        allocated += host.allocated(piece)
        extents += host.extents(piece)
    outside = sum(length - plugged_overlap(model, gpa, length) for gpa, length in extents)
    return Footprint(allocated, tuple(extents), outside)


def plugged_overlap(model: VirtioMemModel, gpa: int, length: int) -> int:
    """Bytes of [gpa, gpa + length) that lie in plugged blocks."""
    bs = model.block_size
    start = gpa - model.geometry.addr
    end = start + length
    first, last = start // bs, (end - 1) // bs
    if first == last:
        return length if model.bitmap.test(first) else 0
    total = model.bitmap.count_range(first + 1, last - first - 1) * bs
    if model.bitmap.test(first):
        total += (first + 1) * bs - start
    if model.bitmap.test(last):
        total += end - last * bs
    return total


def memmap_estimate(model: VirtioMemModel) -> dict[str, Any]:
    """Guest memmap cost of what is plugged, per Linux memory block used."""
    g = model.geometry
    bs = model.block_size
    used = 0
    # Linux memory blocks are aligned to 128 MiB in guest-physical space.
    block = g.addr - g.addr % LINUX_MEMORY_BLOCK
    end = g.addr + g.region_size
    while block < end:
        lo = max(block, g.addr)
        hi = min(block + LINUX_MEMORY_BLOCK, end)
        first = (lo - g.addr) // bs
        count = -(-(hi - g.addr) // bs) - first
        if model.bitmap.count_range(first, count):
            used += 1
        block += LINUX_MEMORY_BLOCK
    memmap = used * MEMMAP_PER_MEMORY_BLOCK
    plugged = model.plugged_size
    return {
        "linux_memory_blocks_used": used,
        "memmap_bytes": memmap,
        # Linux 7.2 virtio_mem: memmap from boot memory; the guest gains all it plugged.
        "without_memmap_on_memory": {"guest_gain": plugged, "boot_memory_cost": memmap},
        # With memmap_on_memory the memmap lives inside the plugged range.
        "with_memmap_on_memory": {"guest_gain": max(plugged - memmap, 0), "boot_memory_cost": 0},
    }
