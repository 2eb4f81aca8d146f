"""Recognising a hot-add the guest could not complete, from its requests alone.

Linux's virtio_mem plugs the first device blocks of an empty memory block
(in big-block mode: a whole big block), then adds the memory block to the
kernel. When adding fails (measured on Linux 7.2: -12, no kernel memory left
for the memmap), it unplugs what it just plugged, and tries again on a
timer (50 s, doubling up to 300 s). The device sees a PLUG into empty,
128 MiB-aligned memory blocks ACKed, then an UNPLUG of exactly that range
within ~100 ms, while nothing asked the guest to shrink (plugged ≤
requested). Nothing else the driver does looks like that: it unplugs on its
own only when plugged > requested, and at probe it sends UNPLUG_ALL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WINDOW = 5.0  # seconds from the PLUG to its UNPLUG (measured: 35 ms to ~100 ms under TCG)
CAUSE = ("the guest could not add the memory it plugged and rolled it back; most likely it has "
         "no kernel memory left for the memmap (2M per 128M added, taken from its boot memory "
         "when it onlines movable): it may die of memory exhaustion at its next allocation")


@dataclass(frozen=True)
class Rollback:
    addr: int
    size: int
    seconds: float  # from the PLUG to the UNPLUG
    count: int  # rollbacks since the requested size was last set
    total: int  # since the daemon started

    def to_json(self) -> dict[str, Any]:
        return {"addr": self.addr, "size": self.size, "seconds": round(self.seconds, 3),
                "count": self.count, "total": self.total, "cause": CAUSE}


class RollbackDetector:
    def __init__(self, window: float = WINDOW):
        self.window = window
        self.count = 0
        self.total = 0
        self.last: Rollback | None = None
        self._pending: tuple[int, int, float] | None = None  # a plug that opened memory blocks

    def plugged(self, addr: int, size: int, opened: bool, now: float) -> None:
        """An ACKed PLUG; ``opened``: it went into empty memory blocks, 128 MiB-aligned."""
        # Any other plug means the driver moved on: the last add succeeded.
        self._pending = (addr, size, now) if opened else None

    def unplugged(self, addr: int, size: int, plugged_before: int, requested: int,
                  now: float) -> Rollback | None:
        """An ACKed UNPLUG; the rollback it completes, if it is one."""
        pending, self._pending = self._pending, None
        if pending is None or (addr, size) != pending[:2]:
            return None
        if now - pending[2] > self.window or plugged_before > requested:
            return None  # late, or the guest was asked to shrink
        self.count += 1
        self.total += 1
        self.last = Rollback(addr, size, now - pending[2], self.count, self.total)
        return self.last

    def unplugged_all(self) -> None:
        self._pending = None

    def requested_changed(self) -> None:
        """A new episode: count what happens for this requested size."""
        self.count = 0

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "total": self.total,
                "last": self.last.to_json() if self.last else None}
