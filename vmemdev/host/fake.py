"""An in-memory host for unit tests: no fds, no syscalls, failures on demand.

``FakeHost`` records which guest-physical bytes hold data, the way a memfd's
pages would; ``FakeMemory`` is a guest memory table of (gpa, size) regions.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import GuestMemoryError, NativeError
from .interface import Backing


class FakeMemory:
    """Implements ``vmemdev.host.interface.Memory`` over named ranges."""

    def __init__(self, regions: Sequence[tuple[int, int]] = ()):
        self.regions = list(regions)  # (gpa, size); fd = index
        self.generation = 0

    def all_backing(self) -> list[Backing]:
        return [Backing(fd, 0, size, start, start) for fd, (start, size) in enumerate(self.regions)]

    def backing(self, gpa: int, length: int) -> list[Backing]:
        pieces = []
        pos, end = gpa, gpa + length
        while pos < end:
            for fd, (start, size) in enumerate(self.regions):
                if start <= pos < start + size:
                    take = min(end, start + size) - pos
                    pieces.append(Backing(fd, pos - start, take, pos, pos))
                    pos += take
                    break
            else:
                raise GuestMemoryError(f"guest-physical address {pos:#x} is not in any shared region")
        return pieces


class FakeHost:
    """Implements ``vmemdev.host.interface.Host``; data is tracked per 4 KiB page."""

    PAGE = 4096

    def __init__(self) -> None:
        self.pages: set[int] = set()  # gpa // PAGE of pages that hold data
        self.fail_next: dict[str, int] = {}  # "discard"/"populate" -> errno of the next call
        self.calls: list[tuple[str, int, int]] = []

    def touch(self, gpa: int, length: int) -> None:
        """The guest writes [gpa, gpa + length)."""
        self.pages.update(range(gpa // self.PAGE, -(-(gpa + length) // self.PAGE)))

    def _op(self, op: str, pieces: Sequence[Backing], present: bool) -> None:
        errno = self.fail_next.pop(op, 0)
        for piece in pieces:
            if errno:
                raise NativeError(op, errno, piece.file_offset, piece.length)
            self.calls.append((op, piece.gpa, piece.length))
            pages = range(piece.gpa // self.PAGE, (piece.gpa + piece.length) // self.PAGE)
            if present:
                self.pages.update(pages)
            else:
                self.pages.difference_update(pages)

    def discard(self, pieces: Sequence[Backing]) -> None:
        self._op("discard", pieces, False)

    def populate(self, pieces: Sequence[Backing]) -> None:
        self._op("populate", pieces, True)

    def allocated(self, piece: Backing) -> int:
        # counted, not summed over extents(): the memmap observation reads it at every
        # memory block a guest adds (a recorded 32G replay: 256 reads of ~120k pages)
        first, end = piece.gpa // self.PAGE, (piece.gpa + piece.length) // self.PAGE
        if len(self.pages) < end - first:
            return self.PAGE * sum(1 for page in self.pages if first <= page < end)
        return self.PAGE * sum(1 for page in range(first, end) if page in self.pages)

    def extents(self, piece: Backing) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        first, end = piece.gpa // self.PAGE, (piece.gpa + piece.length) // self.PAGE
        if len(self.pages) < end - first:  # a big sparse range: walk what holds data
            present = sorted(page for page in self.pages if first <= page < end)
        else:
            present = [page for page in range(first, end) if page in self.pages]
        for page in present:
            gpa = page * self.PAGE
            if runs and runs[-1][0] + runs[-1][1] == gpa:
                runs[-1] = (runs[-1][0], runs[-1][1] + self.PAGE)
            else:
                runs.append((gpa, self.PAGE))
        return runs
