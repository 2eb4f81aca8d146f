"""How much a guest that onlines hot-added memory movable can safely add.

Each 128 MiB it adds costs 2 MiB of memmap from its kernel memory, and
movable memory cannot hold it: the guest can add at most ~64 × its free
kernel memory, and measured on Linux 7.2 it dies of memory exhaustion
soon after it gets there (../shared/docs/memmap.md). The host cannot see
the guest's free memory; it sees its boot memory (the memory table's
regions outside the device region). So:

    ceiling = 64 × (boot memory − reserve)

where the reserve is the boot memory the guest keeps for itself (kernel,
processes, and enough left free after the memmap is taken to live on).
Default: half the boot memory, at least 192 MiB (a busybox guest measured
~150 MiB in use at the start; real guests use more). The operator sets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..sizes import format_size as fs
from .memmap import MOVABLE
from .model import Geometry

MiB = 1 << 20
MEMMAP_RATIO = 64  # bytes of memory per byte of memmap (4 KiB page / 64-byte struct page)
MIN_DEFAULT_RESERVE = 192 * MiB


def boot_memory(ranges: Sequence[tuple[int, int]], geometry: Geometry) -> int:
    """Bytes of the guest's memory table outside the device region."""
    lo, hi = geometry.addr, geometry.addr + geometry.region_size
    total = 0
    for gpa, size in ranges:
        overlap = max(0, min(gpa + size, hi) - max(gpa, lo))
        total += size - overlap
    return total


def default_reserve(boot: int) -> int:
    return max(MIN_DEFAULT_RESERVE, boot // 2)


@dataclass
class MemmapCeiling:
    reserve: int | None = None  # None: the default for the boot memory seen

    def reserve_for(self, boot: int) -> int:
        return default_reserve(boot) if self.reserve is None else self.reserve

    def ceiling(self, boot: int, block_size: int) -> int:
        size = max(0, boot - self.reserve_for(boot)) * MEMMAP_RATIO
        return size - size % block_size

    def refusal(self, size: int, current: int, boot: int | None, onlining: str,
                block_size: int) -> str | None:
        """Why raising the requested size to ``size`` is refused, or None.

        Only for a guest seen onlining movable: kernel-zone and mixed
        (auto-movable) guests put the memmap in what they add, and an
        unknown policy is not a reason to refuse (see README).
        """
        if onlining != MOVABLE or boot is None or size <= current:
            return None
        limit = self.ceiling(boot, block_size)
        if size <= limit:
            return None
        reserve = self.reserve_for(boot)
        return (f"requested size {fs(size)} is above the memmap ceiling {fs(limit)} of this guest: "
                f"it onlines hot-added memory movable, so every 128M it adds takes 2M of its "
                f"boot memory, and 64 × (boot memory {fs(boot)} − reserve {fs(reserve)}"
                f"{'' if self.reserve is not None else ', the default'}) = {fs(limit)}; "
                f"past it the guest runs out of kernel memory. To ask anyway: "
                f"'vmemdev ctl resize {fs(size)} --force'; or set the reserve: "
                f"'vmemdev ctl reserve SIZE'")

    def report(self, boot: int | None, onlining: str, block_size: int) -> dict[str, Any]:
        if boot is None:
            return {"boot_memory": None, "reserve": self.reserve, "reserve_default": self.reserve is None,
                    "ceiling": None, "applies": False}
        return {"boot_memory": boot, "reserve": self.reserve_for(boot),
                "reserve_default": self.reserve is None,
                "ceiling": self.ceiling(boot, block_size), "applies": onlining == MOVABLE}
