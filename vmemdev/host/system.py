"""The real host: every effect through the cffi shim (``vmemdev.host.native``)."""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

from . import native
from .interface import Backing
from .memory import GuestMemory


class SystemHost:
    """Implements ``vmemdev.host.interface.Host``. Calls block: run long ones on a thread."""

    @staticmethod
    def guest_memory(max_regions: int) -> GuestMemory:
        """An empty memory table for a new front-end connection."""
        return GuestMemory(max_regions)

    def discard(self, pieces: Sequence[Backing]) -> None:
        """One native call per backing fd (touching ranges merge into one syscall)."""
        by_fd: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for piece in pieces:
            by_fd[piece.fd].append((piece.file_offset, piece.length))
        for fd, ranges in by_fd.items():
            native.punch_ranges(fd, ranges)

    def populate(self, pieces: Sequence[Backing]) -> None:
        for piece in pieces:
            native.fallocate(piece.fd, piece.file_offset, piece.length)

    def allocated(self, piece: Backing) -> int:
        st = os.fstat(piece.fd)
        if piece.file_offset == 0 and piece.length == st.st_size:
            return st.st_blocks * 512  # counts fallocate()d pages that SEEK_DATA skips
        return sum(length for _, length in self._file_extents(piece))

    def extents(self, piece: Backing) -> list[tuple[int, int]]:
        return [(piece.gpa + off - piece.file_offset, length) for off, length in self._file_extents(piece)]

    @staticmethod
    def _file_extents(piece: Backing) -> list[tuple[int, int]]:
        return native.data_extents(piece.fd, piece.file_offset, piece.file_offset + piece.length)
