"""The honest account of a device's host memory.

- plugged: what the guest was given (blocks × block size);
- allocated: what the host really holds for the device region, from the
  backing file (see ``Host.allocated``). Never RSS: a process's RSS drops on
  MADV_DONTNEED although nothing was freed;
- outside plugged: allocated bytes in unplugged blocks (must be 0);
- memmap: Linux keeps a 64-byte struct page per 4 KiB page, 2 MiB per 128
  MiB memory block that has any plugged block; where it lives is observed
  (see memmap.py). Linux 7.2's virtio_mem ignores memmap_on_memory: the
  guest gains all it plugged either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..host.interface import Backing, Host
from .memmap import LINUX_MEMORY_BLOCK, MEMMAP_PER_MEMORY_BLOCK, PlacementObserver, memory_blocks_used
from .model import VirtioMemModel

__all__ = ["LINUX_MEMORY_BLOCK", "Footprint", "footprint", "memmap_report", "plugged_overlap"]


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


def memmap_report(model: VirtioMemModel, placement: PlacementObserver) -> dict[str, Any]:
    """The guest's memmap for what is plugged, and where it was seen to live."""
    used = memory_blocks_used(model)
    memmap = used * MEMMAP_PER_MEMORY_BLOCK
    return {
        "linux_memory_blocks_used": used,
        "memmap_bytes": memmap,
        "guest_gain": model.plugged_size,  # all of it: the memmap is never carved out of it
        **placement.report(memmap),
    }
