"""What vmemdev does, unasked, for a guest that onlines hot-added memory movable.

Two policies, both on by default (README, "The memmap limit"):

**The cap.** A guest asked for more than its memmap ceiling before its
onlining could be seen (the requested size given at start, or a resize made
while the verdict was still "unknown") would plug until it runs out of
kernel memory. When the guest is first seen onlining movable, and at every
memory block it adds after that, a requested size above the ceiling is
lowered to the ceiling (never below what is plugged: the cap only stops
the guest, it takes nothing back). A size the operator forced
(``ctl resize --force``) is left alone.

**The rescue.** When the guest rolls back a memory block it could not add
(``rollback.py``), its kernel memory is nearly gone (3-7 MiB measured on
Linux 7.2) and it will likely die at its next allocation. Each 128 MiB
movable block it removes gives back its 2 MiB of memmap; so the requested
size is lowered by 64 × ``margin`` below what is plugged (rounded down to a
whole memory block), which asks the guest to remove ``margin / 2 MiB`` of
the blocks it added last, and, requested now below plugged, stops the
driver's retry timer. It applies to the first rollback after any resize,
forced or not: the guest is failing either way. Only for a guest whose
added blocks all had their memmap outside the region (movable, or movable
so far: an auto-movable guest's first blocks are movable too, and removing
them gives back boot memory just the same): a kernel-zone or mixed guest
puts the memmap in what it adds, so removing blocks gives back little or no
boot memory; and while the onlining is unknown (fewer than 3 blocks added
since the probe, or --prealloc) a plug undone at once is weaker evidence.
Those rollbacks are reported (HOT_ADD_FAILED), not acted on. The cap is
only for a guest called movable (memmap.py: past an auto-movable guest's
first movable run): capping a movable-so-far guest would stop an
auto-movable one that can plug all of it.

No I/O: the device calls these and publishes what it did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..sizes import format_size as fs
from .memmap import LINUX_MEMORY_BLOCK, MEMMAP_PER_MEMORY_BLOCK, MOVABLE, MOVABLE_SO_FAR
from .model import Geometry

MiB = 1 << 20
DEFAULT_RESCUE_MARGIN = 32 * MiB  # kernel memory to give back: 16 memory blocks, 2 GiB removed


def cap_target(requested: int, plugged: int, ceiling: int, onlining: str, forced: bool) -> int | None:
    """The requested size the cap lowers ``requested`` to, or None (leave it)."""
    if onlining != MOVABLE or forced or requested <= ceiling:
        return None
    target = max(ceiling, plugged)
    return target if target < requested else None


def rescue_applies(onlining: str) -> bool:
    return onlining in (MOVABLE, MOVABLE_SO_FAR)


def rescue_target(plugged: int, margin: int, geometry: Geometry) -> int:
    """Requested size that makes the guest remove enough memory blocks to free
    ``margin`` of memmap: whole 128 MiB blocks from the top of what is plugged."""
    blocks = -(-margin // MEMMAP_PER_MEMORY_BLOCK)
    end = geometry.addr + plugged - blocks * LINUX_MEMORY_BLOCK
    end -= end % LINUX_MEMORY_BLOCK
    target = max(0, end - geometry.addr)
    return target - target % geometry.block_size


@dataclass
class Protection:
    rescue_margin: int | None = DEFAULT_RESCUE_MARGIN  # None: rescue off
    caps: int = 0
    rescues: int = 0
    last: dict[str, Any] | None = None  # the last thing done, as published

    def set_rescue_margin(self, margin: int | None) -> None:
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int) or margin <= 0):
            raise ConfigError(f"memmap rescue margin {margin!r} must be a positive size (or off)")
        self.rescue_margin = margin

    def capped(self, before: int, after: int, ceiling: int, boot: int, reserve: int) -> dict[str, Any]:
        self.caps += 1
        self.last = {"action": "cap", "requested_before": before, "requested": after, "ceiling": ceiling,
                     "boot_memory": boot, "reserve": reserve,
                     "reason": (f"the guest onlines hot-added memory movable and was asked for {fs(before)}, "
                                f"above its memmap ceiling {fs(ceiling)} = 64 x (boot memory {fs(boot)} - "
                                f"reserve {fs(reserve)}): requested lowered to {fs(after)} so that it stops "
                                f"before it runs out of kernel memory; to go further: "
                                f"'vmemdev ctl resize {fs(before)} --force'")}
        return self.last

    def rescued(self, before: int, after: int, plugged: int, margin: int) -> dict[str, Any]:
        self.rescues += 1
        removed = -(-(plugged - after) // LINUX_MEMORY_BLOCK)
        self.last = {"action": "rescue", "requested_before": before, "requested": after, "plugged": plugged,
                     "margin": margin, "memory_blocks_to_remove": removed,
                     "memmap_regained": removed * MEMMAP_PER_MEMORY_BLOCK,
                     "reason": (f"the guest could not add memory (kernel memory for the memmap exhausted): "
                                f"requested lowered from {fs(before)} to {fs(after)}, below plugged "
                                f"{fs(plugged)}, so that it removes {removed} memory block(s) it added and "
                                f"gets back ~{fs(removed * MEMMAP_PER_MEMORY_BLOCK)} of kernel memory, "
                                f"and stops retrying (rescue margin {fs(margin)}; "
                                f"'vmemdev ctl rescue off' disables it)")}
        return self.last

    def to_json(self) -> dict[str, Any]:
        return {"rescue_margin": self.rescue_margin, "rescue": self.rescue_margin is not None,
                "caps": self.caps, "rescues": self.rescues, "last": self.last}
