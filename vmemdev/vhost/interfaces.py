"""What the engine needs from a device and from the host's guest-memory mapping.

A device type (virtio-mem, or the tests' echo device) implements
``Device``; ``vmemdev.host.memory.GuestMemory`` implements ``GuestMemory``.
The engine holds both by these interfaces only, so it imports neither.
"""

from __future__ import annotations

from typing import Protocol

from ..protocol.vhost_user import MemoryRegion
from ..protocol.virtqueue import Area, RingAccess


class Device(Protocol):
    """A virtio device served through the generic engine."""

    device_id: int
    num_queues: int
    features: int  # the device's own feature bits; the engine adds the transport's

    def set_features(self, features: int) -> None:
        """The driver's accepted features (the device's own bits only)."""

    def read_config(self, offset: int, size: int) -> bytes | None:
        """Config space bytes, or None when the range is outside it."""

    def write_config(self, offset: int, data: bytes) -> None:
        """Raise PeerError to refuse (read-only config)."""

    def rings_enabled(self) -> None:
        """A ring was enabled: the memory table is complete by now."""


class GuestMemory(Protocol):
    """Guest memory as the front-end shared it (bounds-checked accessors)."""

    generation: int
    ring_access: RingAccess

    def add(self, desc: MemoryRegion, fd: int) -> bool:
        """Map one region; True when the memory now owns ``fd``."""

    def remove(self, desc: MemoryRegion) -> None: ...

    def replace_all(self, descs: tuple[MemoryRegion, ...], fds: tuple[int, ...]) -> set[int]:
        """SET_MEM_TABLE; returns the fds it now owns."""

    def table(self) -> tuple[MemoryRegion, ...]:
        """The regions mapped now, in order."""
        ...

    def fds(self) -> tuple[int, ...]:
        """The regions' fds, in the order of ``table()``."""
        ...

    def uva_area(self, uaddr: int, length: int) -> Area: ...

    def check_gpa(self, gpa: int, length: int) -> None: ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...
