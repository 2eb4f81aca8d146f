"""Where the guest keeps the memmap of the memory it adds, as the host sees it.

Linux needs 64 bytes of ``struct page`` per 4 KiB page, 2 MiB per 128 MiB
memory block, before it can use added memory. Linux 7.2's virtio_mem takes
it from memory that is already online and usable by the kernel (it ignores
``memory_hotplug.memmap_on_memory``). Measured (../shared/docs/memmap.md):
with kernel-zone onlining, each added block's memmap lands in earlier
plugged blocks, so the device region's allocation grows by 2 MiB per block
at once; with movable onlining it comes out of boot memory and the region
grows by nothing.

``PlacementObserver`` turns that into an observation: it is sampled when the
guest plugs into an empty memory block (by then it has added and onlined
every earlier block) with the region's allocation, and counts, per block
added, whether ~2 MiB appeared in the region. No I/O: the caller measures.

Auto-movable onlining (``memory_hotplug.online_policy=auto-movable``) onlines
added memory movable as long as movable ≤ 301 % of the kernel memory, so its
first ~3 × boot memory looks exactly like a movable guest (measured with
512 MiB of boot memory: 12 blocks movable, then the 13th, kernel-zone, still
with its memmap in boot memory, and from then on the memmap in the region).
A guest is called movable only once it added more than that with nothing
in the region; before, it is movable so far: its recent blocks' memmap did
come from boot memory (what the rescue needs), but it may still turn out
mixed (so no ceiling yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import VirtioMemModel

LINUX_MEMORY_BLOCK = 128 << 20  # Linux's memory block on x86-64 (sysfs block_size_bytes)
MEMMAP_PER_MEMORY_BLOCK = LINUX_MEMORY_BLOCK // 64

# A block whose adding grew the region by at least this much had its memmap put there.
IN_REGION_THRESHOLD = MEMMAP_PER_MEMORY_BLOCK // 2
# Blocks observed before saying anything: the first block's memmap comes from
# boot memory whatever the policy (nothing of the region is online yet).
MIN_OBSERVED = 3

# Linux's default memory_hotplug.auto_movable_ratio (percent): an auto-movable
# guest onlines movable while movable <= ratio x kernel memory.
AUTO_MOVABLE_RATIO = 301

KERNEL, MOVABLE, MIXED, UNKNOWN = "kernel", "movable", "mixed", "unknown"
MOVABLE_SO_FAR = "movable-so-far"  # all outside, but no more than auto-movable puts movable first


def movable_after(boot: int | None) -> int:
    """Blocks seen with their memmap outside the region before a guest with
    ``boot`` of boot memory is called movable: the movable run an auto-movable
    guest starts with, its first kernel-zone block (whose memmap still comes
    from boot memory), and one block of slack for the kernel's own count of
    its memory (a little less than the memory table's)."""
    if boot is None:
        return MIN_OBSERVED
    return max(MIN_OBSERVED, AUTO_MOVABLE_RATIO * boot // 100 // LINUX_MEMORY_BLOCK + 2)


def memory_blocks(model: VirtioMemModel, addr: int, size: int) -> range:
    """Indexes (gpa // 128 MiB) of the Linux memory blocks [addr, addr + size) touches."""
    return range(addr // LINUX_MEMORY_BLOCK, -(-(addr + size) // LINUX_MEMORY_BLOCK))


def memory_block_plugged(model: VirtioMemModel, index: int) -> int:
    """Device blocks plugged in Linux memory block ``index``."""
    g = model.geometry
    lo = max(index * LINUX_MEMORY_BLOCK, g.addr)
    hi = min((index + 1) * LINUX_MEMORY_BLOCK, g.addr + g.region_size)
    if hi <= lo:
        return 0
    first = (lo - g.addr) // model.block_size
    count = -(-(hi - g.addr) // model.block_size) - first
    return model.bitmap.count_range(first, count)


def opens_memory_blocks(model: VirtioMemModel, addr: int, size: int) -> bool:
    """True when a plug of [addr, addr + size) starts 128 MiB-aligned into memory
    blocks with nothing plugged: the driver must add (hot-add) them next."""
    if addr % LINUX_MEMORY_BLOCK:
        return False
    return all(memory_block_plugged(model, i) == 0 for i in memory_blocks(model, addr, size))


def memory_blocks_used(model: VirtioMemModel) -> int:
    """Linux memory blocks of the region with anything plugged."""
    g = model.geometry
    return sum(1 for i in memory_blocks(model, g.addr, g.region_size) if memory_block_plugged(model, i))


@dataclass
class PlacementObserver:
    blocks_in_region: int = 0  # added blocks whose memmap appeared in the region
    blocks_outside: int = 0  # added blocks whose memmap did not
    held_in_region: int = 0  # bytes of memmap seen appearing in the region
    movable_after: int = MIN_OBSERVED  # see movable_after(): set from the guest's boot memory
    _last: tuple[int, int] | None = None  # (memory blocks used, allocated) at the last sample

    def sample(self, blocks_used: int, allocated: int) -> None:
        """The guest starts a new memory block; ``allocated`` is the region's
        host allocation now, less what the host itself populated (prealloc)."""
        last, self._last = self._last, (blocks_used, allocated)
        if last is None:
            return
        added, grew = blocks_used - last[0], allocated - last[1]
        if added <= 0:
            return
        if grew >= added * IN_REGION_THRESHOLD:
            self.blocks_in_region += added
            self.held_in_region += min(grew, added * MEMMAP_PER_MEMORY_BLOCK)
        else:
            self.blocks_outside += added

    def interrupted(self) -> None:
        """Something was unplugged: the next growth is not one block's memmap."""
        self._last = None

    def reset(self) -> None:
        """A new boot of the guest (UNPLUG_ALL): what it does now is all that counts."""
        self.blocks_in_region = self.blocks_outside = self.held_in_region = 0
        self._last = None

    @property
    def onlining(self) -> str:
        """kernel, movable, movable-so-far, mixed (auto-movable does this), or unknown."""
        seen = self.blocks_in_region + self.blocks_outside
        if seen < MIN_OBSERVED:
            return UNKNOWN
        if self.blocks_in_region == 0:
            return MOVABLE if self.blocks_outside >= self.movable_after else MOVABLE_SO_FAR
        if self.blocks_outside <= 1:
            return KERNEL
        return MIXED

    def report(self, memmap_bytes: int) -> dict[str, Any]:
        held = min(self.held_in_region, memmap_bytes)
        return {
            "onlining": self.onlining,
            "blocks_observed": {"memmap_in_region": self.blocks_in_region,
                                "memmap_outside": self.blocks_outside},
            "held_in_region": held,  # measured
            "charged_to_boot_memory": memmap_bytes - held,  # estimated: the rest
        }
