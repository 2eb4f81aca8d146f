"""How much of the VM's memory cgroup a plug may take. No I/O.

A plug is acknowledged only if, after it, the cgroup can still absorb
everything the device has promised, with a guard band to spare:

    need  = cost(plug)
    room  = limit - usage - cost(guest RAM not yet allocated) - band
    ACK only if need <= room

- ``usage`` is the counter the kernel enforces the limit on, at the level
  whose limit binds first (``vmemdev.host.cgroup``).
- Guest RAM the host has not allocated yet (plugged blocks of the device,
  and the rest of the memory table: boot RAM, other DIMMs) costs nothing
  now, but the guest may write it at any moment and the page faults are
  charged then: it counts as already used.
- ``cost`` adds the kernel's own memory per byte of guest memory: page
  tables of the mappings and the page cache's index nodes, charged to the
  same cgroup. Measured (`python -m bench.cgroup_band`, committed in
  bench/results/cgroup-band.txt): 1/512 to 1/431 of the size for a
  fallocate, 1/228 for pages touched through a mapping (page tables
  included). ``OVERHEAD_DIVISOR`` reserves 1/128.
- ``band`` absorbs what a plug cannot foresee: per-CPU charge batches and
  the growth of the processes in the cgroup (QEMU, the daemon when it runs
  there). Configurable (``serve --cgroup-band``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..host.interface import CgroupReading
from ..sizes import format_size

OVERHEAD_DIVISOR = 128
DEFAULT_BAND = 32 << 20


def cost(size: int) -> int:
    """Bytes a cgroup is charged for ``size`` bytes of guest memory, at most."""
    return size + -(-size // OVERHEAD_DIVISOR)


@dataclass(frozen=True)
class Unallocated:
    """Guest RAM bytes the host has not allocated yet."""

    plugged: int  # in plugged blocks of the device region
    other: int  # in the rest of the memory table (boot RAM, other DIMMs)

    @property
    def total(self) -> int:
        return self.plugged + self.other


@dataclass(frozen=True)
class Assessment:
    """The figures a headroom decision used, for the BUSY reason and `ctl limits`."""

    path: str
    limit: int | None
    usage: int
    limited_by: str | None
    unallocated: Unallocated
    band: int
    need: int  # cost of what is being asked for (0: just looking)

    @property
    def committed(self) -> int:
        return cost(self.unallocated.total)

    @property
    def room(self) -> int | None:
        """What a new plug may cost, or None without a limit."""
        if self.limit is None:
            return None
        return self.limit - self.usage - self.committed - self.band

    @property
    def fits(self) -> bool:
        room = self.room
        return room is None or self.need <= room

    def reason(self) -> str:
        where = "" if self.limited_by in (None, self.path) else f" (limited by {self.limited_by})"
        return (
            f"cgroup {self.path}{where}: limit {_size(self.limit)}, usage {_size(self.usage)}, "
            f"guest RAM not yet allocated {_size(self.committed)}, band {_size(self.band)}: "
            f"room {_size(max(self.room or 0, 0))}, {_size(self.need)} needed"
        )

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "limit": self.limit, "usage": self.usage,
                "limited_by": self.limited_by, "unallocated_plugged": self.unallocated.plugged,
                "unallocated_other": self.unallocated.other, "committed": self.committed, "band": self.band, "room": self.room}


def _size(value: int | None) -> str:
    if value is None:
        return "none"
    return format_size(value) if value % (1 << 20) == 0 else f"{value / (1 << 20):.1f}M"


@dataclass(frozen=True)
class HeadroomRule:
    band: int = DEFAULT_BAND

    def assess(self, path: str, reading: CgroupReading, unallocated: Unallocated,
               size: int = 0) -> Assessment:
        return Assessment(path, reading.limit, reading.usage, reading.limited_by,
                          unallocated, self.band, cost(size) if size else 0)
