"""Guest memory as the front-end shared it: regions, mappings, translation.

Each region from SET_MEM_TABLE / ADD_MEM_REG is mapped MAP_SHARED from its
fd, and the fd is kept: discarding goes through it. Addresses come from the
peer (front-end virtual addresses for rings, guest-physical addresses for
buffers) and are checked against the regions before anything is read or
written. Accessors return (mmap, offset) so callers use struct's
``unpack_from``/``pack_into`` without holding buffer exports, which would
stop a region from being unmapped.
"""

from __future__ import annotations

import abc
import bisect
import logging
import mmap
import os
import stat

from ..errors import GuestMemoryError, PeerError
from ..protocol.vhost_user import MemoryRegion
from ..protocol.virtqueue import Area, RingAccess
from . import native
from .interface import Backing

log = logging.getLogger(__name__)


class GpaAccess(abc.ABC):
    """Reads and writes of guest-physical ranges through ``gpa_area``."""

    @abc.abstractmethod
    def gpa_area(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """(mapping, offset) of [gpa, gpa + length); raises if it is not mapped."""

    def read(self, gpa: int, length: int) -> bytes:
        mm, off = self.gpa_area(gpa, length)
        return mm[off : off + length]

    def write(self, gpa: int, data: bytes) -> None:
        mm, off = self.gpa_area(gpa, len(data))
        mm[off : off + len(data)] = data


class MappedRegion:
    def __init__(self, desc: MemoryRegion, fd: int):
        self.desc = desc
        self.fd = fd
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise PeerError(f"memory region fd: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise PeerError(
                f"memory region at gpa {desc.guest_phys_addr:#x} is not backed by a regular "
                "file or memfd"
            )
        end = desc.mmap_offset + desc.memory_size
        # Touching a mapping past the end of its file raises SIGBUS: refuse it up front.
        if st.st_size < end:
            raise PeerError(
                f"memory region at gpa {desc.guest_phys_addr:#x} needs {end} bytes of its "
                f"file but the file has {st.st_size}"
            )
        # mmap offsets must be page-aligned; map from the page below and skip the rest.
        self._skip = desc.mmap_offset % mmap.ALLOCATIONGRANULARITY
        try:
            self.mm = mmap.mmap(
                fd,
                desc.memory_size + self._skip,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=desc.mmap_offset - self._skip,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise PeerError(f"cannot map region at gpa {desc.guest_phys_addr:#x}: {exc}") from exc
        self.address = native.buffer_address(self.mm) + self._skip

    @property
    def gpa(self) -> int:
        return self.desc.guest_phys_addr

    @property
    def size(self) -> int:
        return self.desc.memory_size

    @property
    def uaddr(self) -> int:
        return self.desc.userspace_addr

    def close(self, close_fd: bool = True) -> None:
        try:
            self.mm.close()
        except BufferError:  # a view is still exported: leak the mapping, never crash
            log.error("region at gpa %#x still in use; mapping left in place", self.gpa)
        if close_fd:
            try:
                os.close(self.fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<region gpa={self.gpa:#x} size={self.size:#x} fd={self.fd}>"


class SharedRingAccess:
    """Ring index accesses through the C shim: single, ordered loads and stores."""

    load_acquire_u16 = staticmethod(native.load_acquire_u16)
    publish_used = staticmethod(native.publish_used)


class GuestMemory(GpaAccess):
    """The set of regions currently shared by the front-end."""

    ring_access: RingAccess = SharedRingAccess()

    def __init__(self, max_regions: int):
        self.max_regions = max_regions
        self._regions: list[MappedRegion] = []  # sorted by gpa
        self._starts: list[int] = []
        self.generation = 0  # bumped on every change, so users can remap

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return tuple(self._regions)

    def _reindex(self) -> None:
        self._regions.sort(key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self._regions]
        self.generation += 1

    def add(self, desc: MemoryRegion, fd: int) -> bool:
        """Map one region; True when it now owns ``fd`` (a region announced
        twice keeps the first fd). On failure the caller still owns ``fd``."""
        for region in self._regions:
            if region.desc == desc:
                log.debug("region %s added twice; keeping the first", desc)
                return False
        if len(self._regions) >= self.max_regions:
            raise PeerError(f"more than {self.max_regions} memory regions")
        for other in self._regions:
            if desc.guest_phys_addr < other.desc.gpa_end and other.gpa < desc.gpa_end:
                raise PeerError(
                    f"region gpa {desc.guest_phys_addr:#x}+{desc.memory_size:#x} overlaps {other}"
                )
        self._regions.append(MappedRegion(desc, fd))
        self._reindex()
        return True

    def remove(self, desc: MemoryRegion) -> None:
        for region in self._regions:
            if (
                region.gpa == desc.guest_phys_addr
                and region.size == desc.memory_size
                and region.uaddr == desc.userspace_addr
            ):
                self._regions.remove(region)
                region.close()
                self._reindex()
                return
        raise PeerError(
            f"REM_MEM_REG: no region at gpa {desc.guest_phys_addr:#x} size {desc.memory_size:#x}"
        )

    def replace_all(self, descs: tuple[MemoryRegion, ...], fds: tuple[int, ...]) -> set[int]:
        """SET_MEM_TABLE: build the new table fully before dropping the old one.

        Returns the fds the new regions own; on failure nothing is kept.
        """
        new = GuestMemory(self.max_regions)
        try:
            for desc, fd in zip(descs, fds):
                new.add(desc, fd)
        except BaseException:
            for region in new._regions:
                region.close(close_fd=False)  # the caller still owns every fd
            raise
        self.close()
        self._regions = new._regions
        self._reindex()
        return {region.fd for region in self._regions}

    def describe(self) -> str:
        return ", ".join(repr(r) for r in self._regions)

    def close(self) -> None:
        for region in self._regions:
            region.close()
        self._regions = []
        self._reindex()

    # --- translation ---------------------------------------------------------

    def _find_gpa(self, gpa: int) -> MappedRegion | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._regions[i].desc.gpa_end:
            return self._regions[i]
        return None

    def gpa_area(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """(mapping, offset) of [gpa, gpa + length), which must lie in one region."""
        region = self._find_gpa(gpa)
        if region is None or length < 0 or gpa + length > region.desc.gpa_end:
            raise GuestMemoryError(
                f"guest-physical range {gpa:#x}+{length:#x} is not inside one shared region"
            )
        return region.mm, region._skip + gpa - region.gpa

    def check_gpa(self, gpa: int, length: int) -> None:
        self.gpa_area(gpa, length)

    def uva_area(self, uaddr: int, length: int) -> Area:
        """Where a front-end virtual range (a ring) is in our mappings."""
        for region in self._regions:
            if region.uaddr <= uaddr and uaddr + length <= region.uaddr + region.size:
                delta = uaddr - region.uaddr
                return Area(region.mm, region._skip + delta, region.address + delta)
        raise GuestMemoryError(
            f"front-end address range {uaddr:#x}+{length:#x} is not inside one shared region"
        )

    def table(self) -> tuple[MemoryRegion, ...]:
        return tuple(r.desc for r in self._regions)

    def fds(self) -> tuple[int, ...]:
        return tuple(r.fd for r in self._regions)

    def all_backing(self) -> list[Backing]:
        """Every region's fd piece: all the guest RAM the front-end shared."""
        return [Backing(r.fd, r.desc.mmap_offset, r.size, r.address, r.gpa) for r in self.regions]

    def backing(self, gpa: int, length: int) -> list[Backing]:
        """The fd pieces behind [gpa, gpa + length); raises if any part is unshared."""
        pieces = []
        pos, end = gpa, gpa + length
        while pos < end:
            region = self._find_gpa(pos)
            if region is None:
                raise GuestMemoryError(f"guest-physical address {pos:#x} is not in any shared region")
            take = min(end, region.desc.gpa_end) - pos
            delta = pos - region.gpa
            pieces.append(
                Backing(region.fd, region.desc.mmap_offset + delta, take, region.address + delta, pos)
            )
            pos += take
        return pieces
