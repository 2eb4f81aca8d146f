"""The host effects a device may ask for, as an interface with no I/O of its own.

``vmemdev.host.system.SystemHost`` does them for real (through the cffi
shim); ``vmemdev.host.fake.FakeHost`` keeps them in memory for unit tests.
Layers above import this module, never the implementations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Backing:
    """A piece of a guest-physical range: which fd and where in it."""

    fd: int
    file_offset: int
    length: int
    address: int  # our virtual address of the same bytes
    gpa: int


class Memory(Protocol):
    """The part of a connection's guest memory a device uses."""

    generation: int

    def backing(self, gpa: int, length: int) -> list[Backing]:
        """The fd pieces behind [gpa, gpa + length); raises GuestMemoryError if unshared."""
        ...

    def ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of every region the front-end shared."""
        ...


class Host(Protocol):
    def discard(self, pieces: Sequence[Backing]) -> None:
        """Give the pieces' memory back to the host; raises HostError."""

    def populate(self, pieces: Sequence[Backing]) -> None:
        """Allocate the pieces' memory now; raises HostError (partly done)."""

    def allocated(self, piece: Backing) -> int:
        """Bytes the host holds for the piece (raises OSError)."""
        ...

    def extents(self, piece: Backing) -> list[tuple[int, int]]:
        """(gpa, length) runs of the piece that hold data (raises OSError)."""
        ...


@dataclass(frozen=True)
class CgroupReading:
    limit: int | None  # None: no limit
    usage: int

    def headroom(self) -> int | None:
        return None if self.limit is None else self.limit - self.usage


class CgroupProbe(Protocol):
    path: str
    version: int

    def read(self) -> CgroupReading:
        """Limit and usage now; raises OSError."""
        ...

    def check_headroom(self, size: int) -> str | None:
        """None if ``size`` more bytes fit; otherwise the reason."""
        ...
