"""One virtio-mem device instance: the model plus the host-side work.

A ``DeviceService`` outlives front-end connections (a restarted VM
reconnects to the same device). It executes guest requests: the pure model
decides, the native shim discards (or preallocates), limits are checked, and
only a successful host operation is committed. It is also the in-process API
the control socket drives: resize, limits, status, accounting, events.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable

import trio

from ..host import accounting
from ..host import native
from ..virtio_mem.model import BUSY
from ..virtio_mem.model import NACK
from ..virtio_mem.model import Answer
from ..virtio_mem.model import Geometry
from ..virtio_mem.model import Plug
from ..virtio_mem.model import Unplug
from ..virtio_mem.model import UnplugAll
from ..virtio_mem.model import VirtioMemDevice
from ..errors import ConfigError, GuestMemoryError, NativeError
from .events import EventBus
from ..host.cgroup import Cgroup
from ..host.memory import Backing
from ..host.memory import GuestMemory
from ..protocol.virtio_mem import MemRequest, MemResponse, RequestType, ResponseType
from ..sizes import format_size

log = logging.getLogger(__name__)

# Enum lookups by value cost ~1 µs each on the request path; plain dicts do not.
_REQUEST_NAMES = {t.value: t.name for t in RequestType}
_RESPONSE_NAMES = {t.value: t.name for t in ResponseType}

MISSING_BACKING_HINT = (
    "give QEMU shared, fd-backed RAM at the device address, e.g. "
    "'-object memory-backend-file,id=hp0,size=SIZE,share=on,mem-path=PATH "
    "-device pc-dimm,id=dimm0,memdev=hp0,addr=ADDR' with the guest booted with "
    "'acpi_no_memhotplug', and all guest RAM shared "
    "('-object memory-backend-memfd,id=ram,size=...,share=on -machine memory-backend=ram')"
)


@dataclass
class Limits:
    """Operator limits on what the device may hold (cgroup-style names)."""

    memory_max: int | None = None  # plugged bytes never exceed this
    memory_high: int | None = None  # host footprint above this lowers requested_size

    def to_json(self) -> dict:
        return {"memory.max": self.memory_max, "memory.high": self.memory_high}


class Stats:
    """Request counters and a latency window for ``vmemdev ctl stats``."""

    def __init__(self, window: int = 10000):
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.nacks_by_reason: collections.Counter[str] = collections.Counter()
        self.busy_by_reason: collections.Counter[str] = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=window)
        self.bytes_discarded = 0
        self.bytes_preallocated = 0

    def to_json(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6, 1) if lat else None

        by_type: dict[str, dict[str, int]] = {}
        for (kind, outcome), n in sorted(self.requests.items()):
            by_type.setdefault(kind, {})[outcome] = n
        return {
            "requests": by_type,
            "nacks_by_reason": dict(self.nacks_by_reason),
            "busy_by_reason": dict(self.busy_by_reason),
            "latency_us": {"samples": len(lat), "p50": pct(0.5), "p99": pct(0.99),
                           "max": round(lat[-1] * 1e6, 1) if lat else None},
            "bytes_discarded": self.bytes_discarded,
            "bytes_preallocated": self.bytes_preallocated,
        }


class DeviceService:
    def __init__(
        self,
        geometry: Geometry,
        requested_size: int = 0,
        *,
        limits: Limits | None = None,
        cgroup: Cgroup | None = None,
        prealloc: bool = False,
    ):
        self.device = VirtioMemDevice(geometry, 0)
        self.limits = limits or Limits()
        self.cgroup = cgroup
        self.prealloc = prealloc
        self.events = EventBus()
        self.stats = Stats()
        self.memory: GuestMemory | None = None  # set while a front-end is attached
        # Serialises guest requests against memory-table changes and ring stops.
        self.request_lock = trio.Lock()
        self._notifier: Callable[[], None] | None = None
        self._warned_generation: int | None = None
        self.frontend_attached = False
        self.sessions_ended = 0  # front-end connections served to the end
        self.check_requested_size(requested_size)
        self.device.set_requested_size(requested_size)

    @property
    def geometry(self) -> Geometry:
        return self.device.geometry

    # --- operator API --------------------------------------------------------

    def check_requested_size(self, size: int) -> None:
        """Raise ConfigError with the reason if ``size`` may not be requested."""
        self.device.check_requested_size(size)
        if self.limits.memory_max is not None and size > self.limits.memory_max:
            raise ConfigError(
                f"requested size {format_size(size)} is above memory.max "
                f"({format_size(self.limits.memory_max)})"
            )

    def resize(self, requested_size: int, *, reason: str = "operator") -> bool:
        """Set requested_size; sends exactly one config notification if it changed.

        Raises ConfigError (unaligned, above the region or memory.max) with the reason.
        """
        self.check_requested_size(requested_size)
        changed = self.device.set_requested_size(requested_size)
        d = self.device
        log.info(
            "requested size set to %s by %s (usable %s, plugged %s)%s",
            format_size(requested_size), reason, format_size(d.usable_region_size),
            format_size(d.plugged_size), "" if changed else ", unchanged",
        )
        if changed:
            self.notify_config_change()
        return changed

    def set_limit(self, name: str, value: int | None) -> None:
        """memory.max / memory.high; None means no limit. May lower requested_size."""
        bs = self.device.block_size
        if value is not None:
            if value < 0 or value % bs:
                raise ConfigError(f"{name} {value} must be a multiple of the block size {format_size(bs)}")
        if name == "memory.max":
            self.limits.memory_max = value
            if value is not None and self.device.requested_size > value:
                # The guest is asked to give back what is above the new maximum.
                self.resize(value, reason="memory.max")
        elif name == "memory.high":
            self.limits.memory_high = value
        else:
            raise ConfigError(f"unknown limit {name!r} (memory.max, memory.high)")
        log.info("%s set to %s", name, "max" if value is None else format_size(value))
        self.events.publish("LIMIT_CHANGED", name=name, value=value)
        if name == "memory.high":
            self.enforce_memory_high()

    def set_notifier(self, notifier: Callable[[], None] | None) -> None:
        self._notifier = notifier

    def notify_config_change(self) -> None:
        d = self.device
        if self._notifier is None:
            log.info("no front-end attached: the driver reads the new config when it probes")
        else:
            self._notifier()
        self.events.publish("CONFIG_CHANGE_SENT", requested=d.requested_size,
                            usable=d.usable_region_size, plugged=d.plugged_size,
                            delivered=self._notifier is not None)

    # --- accounting and memory.high ------------------------------------------

    def footprint(self) -> accounting.Footprint | None:
        memory = self.memory
        g = self.geometry
        if memory is None:
            return None
        try:
            pieces = memory.backing(g.addr, g.region_size)
        except GuestMemoryError:
            return None
        return accounting.footprint(self.device, pieces)

    def enforce_memory_high(self) -> None:
        """Above memory.high, ask the guest to shrink; never unplug behind its back."""
        high = self.limits.memory_high
        if high is None:
            return
        fp = self.footprint()
        if fp is None or fp.allocated <= high:
            return
        target = min(self.device.requested_size, high - high % self.device.block_size)
        if target < self.device.requested_size:
            self.resize(target, reason="memory.high")
            self.events.publish("MEMORY_HIGH_EXCEEDED", footprint=fp.allocated, high=high,
                                requested=target)

    async def monitor(self, interval: float = 1.0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Watch memory.high; runs for the daemon's life."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            try:
                self.enforce_memory_high()
            except OSError as exc:
                log.warning("cannot measure the device footprint: %s", exc)

    def status(self) -> dict:
        d = self.device
        g = self.geometry
        fp = self.footprint()
        return {
            "geometry": {"addr": g.addr, "region_size": g.region_size, "block_size": g.block_size,
                         "node_id": g.node_id},
            "plugged_size": d.plugged_size,
            "requested_size": d.requested_size,
            "usable_region_size": d.usable_region_size,
            "frontend": "attached" if self.frontend_attached else "waiting",
            "backed": self.memory is not None and fp is not None,
            "limits": self.limits.to_json(),
            "cgroup": self.cgroup.path if self.cgroup else None,
            "prealloc": self.prealloc,
            "host_allocated": fp.allocated if fp else None,
        }

    def accounting(self) -> dict:
        fp = self.footprint()
        return {
            "plugged_size": self.device.plugged_size,
            "plugged_ranges": [list(r) for r in self.device.plugged_ranges()],
            "host_allocated": fp.allocated if fp else None,
            "allocated_extents": [list(e) for e in fp.extents] if fp else None,
            "allocated_outside_plugged": fp.outside_plugged if fp else None,
            "memmap": accounting.memmap_estimate(self.device),
        }

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
            g.addr, format_size(g.region_size), detail, MISSING_BACKING_HINT,
        )

    def check_backing(self) -> bool:
        """Logs once per memory table if the region is unshared."""
        return self.device_backing(self.geometry.addr, self.geometry.region_size) is not None

    # --- guest requests ------------------------------------------------------

    async def execute(self, request: MemRequest) -> MemResponse:
        """Run one validated-type request to its response. Never raises for host failures."""
        started = time.perf_counter()
        decision = self.device.decide(request)
        if isinstance(decision, Answer):
            response = decision.response
            if response.type == ResponseType.NACK:
                self.stats.nacks_by_reason["requested"] += 1
        elif isinstance(decision, Plug):
            response = await self._plug(decision)
        elif isinstance(decision, Unplug):
            response = await self._discard_then_commit(decision, decision.addr, decision.size)
        else:
            response = await self._unplug_all(decision)
        self.stats.latencies.append(time.perf_counter() - started)
        kind = _REQUEST_NAMES[request.type]
        self.stats.requests[(kind, _RESPONSE_NAMES[response.type])] += 1
        d = self.device
        if response.type == ResponseType.ACK and kind != "STATE" and d.plugged_size == d.requested_size:
            self.events.publish("REQUESTED_REACHED", plugged=d.plugged_size)
        return response

    def _nack(self, reason: str, detail: str, decision: Plug) -> MemResponse:
        log.info("PLUG %#x+%s NACKed: %s", decision.addr, format_size(decision.size), detail)
        self.stats.nacks_by_reason[reason] += 1
        self.events.publish("PLUG_NACKED", reason=reason, detail=detail, addr=decision.addr,
                            size=decision.size)
        return NACK.response

    def _busy(self, reason: str, kind: str, gpa: int, size: int, detail: str = "") -> MemResponse:
        """BUSY: Linux retries on a timer (50 s doubling to 300 s) or on the next resize."""
        self.stats.busy_by_reason[reason] += 1
        self.events.publish("BUSY", request=kind, reason=reason, detail=detail, addr=gpa, size=size)
        return BUSY

    async def _plug(self, decision: Plug) -> MemResponse:
        addr, size = decision.addr, decision.size
        max_ = self.limits.memory_max
        if max_ is not None and self.device.plugged_size + size > max_:
            return self._nack("memory.max", f"would exceed memory.max {format_size(max_)}", decision)
        if self.cgroup is not None:
            try:
                problem = self.cgroup.check_headroom(size)
            except OSError as exc:
                log.error("cannot read cgroup %s, answering BUSY: %s", self.cgroup.path, exc)
                return self._busy("cgroup-unreadable", "PLUG", addr, size, str(exc))
            if problem:
                # BUSY, not NACK: Linux takes a NACK as "config changed" and re-sends the
                # PLUG at once, spinning while requested_size stays above plugged_size.
                log.warning("PLUG %#x+%s refused (BUSY): %s", addr, format_size(size), problem)
                return self._busy("cgroup", "PLUG", addr, size, problem)
        pieces = self.device_backing(addr, size)
        if pieces is None:
            return self._busy("region-not-shared", "PLUG", addr, size)
        if self.prealloc:
            # Shielded: a populate that ran is committed (or rolled back) before
            # a cancellation can land, so the model and the host never diverge.
            with trio.CancelScope(shield=True):
                if not await self._populate(pieces, decision):
                    return self._busy("prealloc-failed", "PLUG", addr, size)
                return self.device.commit(decision)
        return self.device.commit(decision)

    async def _populate(self, pieces: list[Backing], decision: Plug) -> bool:
        """Allocate the blocks before ACK; on failure give back what was allocated."""
        try:
            for piece in pieces:
                await native.fallocate_async(piece.fd, piece.file_offset, piece.length)
        except NativeError as exc:
            log.error("preallocating %#x+%s failed, answering BUSY: %s",
                      decision.addr, format_size(decision.size), exc)
            try:
                await discard(pieces)
            except NativeError as undo:
                log.error("rolling back the preallocation failed too: %s", undo)
            return False
        self.stats.bytes_preallocated += decision.size
        return True

    async def _unplug_all(self, decision: UnplugAll) -> MemResponse:
        g = self.geometry
        if decision.plugged_size == 0 and self.device_backing(g.addr, g.region_size) is None:
            return self.device.commit(decision)  # nothing plugged, nothing to give back
        return await self._discard_then_commit(decision, g.addr, g.region_size)

    async def _discard_then_commit(
        self, decision: Unplug | UnplugAll, gpa: int, size: int
    ) -> MemResponse:
        kind = "UNPLUG" if isinstance(decision, Unplug) else "UNPLUG_ALL"
        pieces = self.device_backing(gpa, size)
        if pieces is None:
            return self._busy("region-not-shared", kind, gpa, size)
        # Shielded: a discard that ran is committed before a cancellation can land.
        with trio.CancelScope(shield=True):
            try:
                await discard(pieces)
            except NativeError as exc:
                log.error("discarding %#x+%s failed, answering BUSY: %s", gpa, format_size(size), exc)
                return self._busy("discard-failed", kind, gpa, size, str(exc))
            self.stats.bytes_discarded += decision.size if isinstance(decision, Unplug) else decision.plugged_size
            return self.device.commit(decision)


async def discard(pieces: list[Backing]) -> None:
    """Give the pieces back to the host, one native call per backing fd."""
    by_fd: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for piece in pieces:
        by_fd[piece.fd].append((piece.file_offset, piece.length))
    for fd, ranges in by_fd.items():
        await native.punch_ranges_async(fd, ranges)
