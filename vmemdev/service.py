"""One virtio-mem device instance: the model plus the host-side work.

A ``DeviceService`` outlives front-end connections (a restarted VM
reconnects to the same device). It executes guest requests: the pure model
decides, the native shim discards, and only a successful host operation is
committed. It is also the in-process API for the operator's resize.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

import trio

from . import native
from .device import BUSY, Answer, Geometry, Plug, Unplug, UnplugAll, VirtioMemDevice
from .errors import GuestMemoryError, NativeError
from .memory import Backing, GuestMemory
from .protocol.virtio_mem import MemRequest, MemResponse, RequestType, ResponseType
from .sizes import format_size

log = logging.getLogger(__name__)

MISSING_BACKING_HINT = (
    "give QEMU shared, fd-backed RAM at the device address, e.g. "
    "'-object memory-backend-file,id=hp0,size=SIZE,share=on,mem-path=PATH "
    "-device pc-dimm,id=dimm0,memdev=hp0,addr=ADDR' with the guest booted with "
    "'acpi_no_memhotplug', and all guest RAM shared "
    "('-object memory-backend-memfd,id=ram,size=...,share=on -machine memory-backend=ram')"
)


class DeviceService:
    def __init__(self, geometry: Geometry, requested_size: int = 0):
        self.device = VirtioMemDevice(geometry, requested_size)
        self.memory: GuestMemory | None = None  # set while a front-end is attached
        # Serialises guest requests against memory-table changes and ring stops.
        self.request_lock = trio.Lock()
        self._notifier: Callable[[], None] | None = None
        self.stats: collections.Counter[tuple[str, str]] = collections.Counter()
        self.bytes_discarded = 0
        self._warned_generation: int | None = None
        self.frontend_attached = False
        self.sessions_ended = 0  # front-end connections served to the end

    @property
    def geometry(self) -> Geometry:
        return self.device.geometry

    # --- operator API --------------------------------------------------------

    def resize(self, requested_size: int) -> bool:
        """Set requested_size; sends exactly one config notification if it changed.

        Raises ConfigError (unaligned, above the region) with the reason.
        """
        changed = self.device.set_requested_size(requested_size)
        log.info(
            "requested size set to %s (usable %s, plugged %s)%s",
            format_size(requested_size),
            format_size(self.device.usable_region_size),
            format_size(self.device.plugged_size),
            "" if changed else ", unchanged",
        )
        if changed:
            self.notify_config_change()
        return changed

    def set_notifier(self, notifier: Callable[[], None] | None) -> None:
        self._notifier = notifier

    def notify_config_change(self) -> None:
        if self._notifier is None:
            log.info("no front-end attached: the driver reads the new config when it probes")
        else:
            self._notifier()

    # --- backing -------------------------------------------------------------

    def device_backing(self, gpa: int, size: int) -> list[Backing] | None:
        """The fd pieces behind a device range, or None (logged) when unshared."""
        memory = self.memory
        try:
            if memory is None:
                raise GuestMemoryError("no memory table from the front-end yet")
            return memory.backing(gpa, size)
        except GuestMemoryError as exc:
            generation = memory.generation if memory else None
            if self._warned_generation != generation:
                self._warned_generation = generation
                self.log_missing_backing(str(exc))
            return None

    def log_missing_backing(self, detail: str) -> None:
        g = self.geometry
        log.error(
            "device region %#x+%s is not backed by shared memory from the front-end (%s): "
            "plugs are answered BUSY; %s",
            g.addr,
            format_size(g.region_size),
            detail,
            MISSING_BACKING_HINT,
        )

    def check_backing(self) -> bool:
        """Called after every memory-table change; logs once if the region is unshared."""
        return self.device_backing(self.geometry.addr, self.geometry.region_size) is not None

    # --- guest requests ------------------------------------------------------

    async def execute(self, request: MemRequest) -> MemResponse:
        """Run one validated-type request to its response. Never raises for host failures."""
        decision = self.device.decide(request)
        if isinstance(decision, Answer):
            response = decision.response
        elif isinstance(decision, Plug):
            response = self._plug(decision)
        elif isinstance(decision, Unplug):
            response = await self._discard_then_commit(decision, decision.addr, decision.size)
        else:
            response = await self._unplug_all(decision)
        self.stats[(RequestType(request.type).name, ResponseType(response.type).name)] += 1
        return response

    def _plug(self, decision: Plug) -> MemResponse:
        if self.device_backing(decision.addr, decision.size) is None:
            return BUSY
        return self.device.commit(decision)

    async def _unplug_all(self, decision: UnplugAll) -> MemResponse:
        g = self.geometry
        if decision.plugged_size == 0 and self.device_backing(g.addr, g.region_size) is None:
            return self.device.commit(decision)  # nothing plugged, nothing to give back
        return await self._discard_then_commit(decision, g.addr, g.region_size)

    async def _discard_then_commit(
        self, decision: Unplug | UnplugAll, gpa: int, size: int
    ) -> MemResponse:
        pieces = self.device_backing(gpa, size)
        if pieces is None:
            return BUSY
        try:
            await discard(pieces)
        except NativeError as exc:
            log.error("discarding %#x+%s failed, answering BUSY: %s", gpa, format_size(size), exc)
            return BUSY
        self.bytes_discarded += size
        return self.device.commit(decision)


async def discard(pieces: list[Backing]) -> None:
    """Give the pieces back to the host, one native call per backing fd."""
    by_fd: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for piece in pieces:
        by_fd[piece.fd].append((piece.file_offset, piece.length))
    for fd, ranges in by_fd.items():
        await native.punch_ranges_async(fd, ranges)
