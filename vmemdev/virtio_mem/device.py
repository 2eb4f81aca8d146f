"""The virtio-mem device as the vhost engine and the control plane see it. No I/O.

It owns the model (bitmap and sizes), the operator's limits and the request
statistics. A guest request goes through ``begin``: the model decides, the
limits and the host's cgroup are checked, and either the response is ready
at once or a ``HostWork`` (discard or populate these pieces) comes back. The
daemon runs that work on a worker thread (``HostWork.run``) and hands the
result to ``finish``, which commits the model only if the host did its part.
BUSY, never ERROR, when the host cannot: Linux retries BUSY on a timer.
With a cgroup, a plug must fit it (``headroom``), and a preallocation is
made in chunks, each checked again, so it stops before the limit.

The memory of the attached front-end is borrowed (``attach``/``detach``):
the connection owns it; the device only translates through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..crashpoints import crash_point
from ..errors import ConfigError, GuestMemoryError, HostError, PeerError
from ..host.interface import Backing, CgroupProbe, Host, Memory
from ..protocol import virtio_mem as vm
from ..protocol.virtio_mem import MemRequest, RequestType, ResponseType
from ..sizes import format_size
from .accounting import Footprint, footprint, memmap_report
from .ceiling import MemmapCeiling, boot_memory
from .headroom import Assessment, HeadroomRule, Unallocated
from .limits import MEMORY_HIGH, MEMORY_MAX, Limits
from .memmap import PlacementObserver, memory_blocks_used, movable_after, opens_memory_blocks
from .model import BUSY, NACK, Answer, Geometry, Plug, Unplug, UnplugAll, VirtioMemModel
from .protection import DEFAULT_RESCUE_MARGIN, Protection, cap_target, rescue_applies, rescue_target
from .rollback import RollbackDetector
from .stats import Stats

log = logging.getLogger(__name__)

# Enum lookups by value cost ~1 µs each on the request path; plain dicts do not.
_REQUEST_NAMES = {t.value: t.name for t in RequestType}
_RESPONSE_NAMES = {t.value: t.name for t in ResponseType}
_BUSY = BUSY.pack()
_NACK = NACK.response.pack()

MISSING_BACKING_HINT = (
    "give QEMU shared, fd-backed RAM at the device address, e.g. "
    "'-object memory-backend-file,id=hp0,size=SIZE,share=on,mem-path=PATH "
    "-device pc-dimm,id=dimm0,memdev=hp0,addr=ADDR' with the guest booted with "
    "'acpi_no_memhotplug', and all guest RAM shared "
    "('-object memory-backend-memfd,id=ram,size=...,share=on -machine memory-backend=ram')"
)

Publish = Callable[..., Any]  # publish(event_name, **data)


def _no_events(name: str, /, **data: Any) -> None:
    return None


POPULATE_CHUNK = 16 << 20  # a preallocation checks the cgroup again every chunk


class HeadroomExhausted(HostError):
    """A preallocation stopped because the cgroup ran out of room."""


Guard = Callable[[int], "str | None"]  # guard(bytes about to be allocated) -> refusal reason


@dataclass
class HostWork:
    """Host work a request needs before it can be answered."""

    decision: Plug | Unplug | UnplugAll
    populate: bool  # allocate (PLUG with --prealloc), else discard
    pieces: list[Backing]
    gpa: int
    size: int
    started: float = field(default_factory=time.perf_counter)
    guard: Guard | None = None  # checked before each populate chunk

    @property
    def kind(self) -> str:
        d = self.decision
        return "PLUG" if isinstance(d, Plug) else "UNPLUG" if isinstance(d, Unplug) else "UNPLUG_ALL"

    def run(self, host: Host) -> HostError | None:
        """Do the work (blocking: the daemon calls this on a worker thread).

        A populate that fails is rolled back, so a BUSY leaves nothing allocated.
        """
        try:
            if not self.populate:
                host.discard(self.pieces)
            elif self.guard is None:
                host.populate(self.pieces)
            else:
                for chunk in chunks(self.pieces, POPULATE_CHUNK):
                    refusal = self.guard(sum(p.length for p in chunk))
                    if refusal:
                        raise HeadroomExhausted(refusal)
                    host.populate(chunk)
            crash_point("host-work-done")
        except HostError as exc:
            if self.populate:
                try:
                    host.discard(self.pieces)
                except HostError as undo:
                    log.error("rolling back the preallocation failed too: %s", undo)
            return exc
        return None


def chunks(pieces: list[Backing], size: int) -> list[list[Backing]]:
    """The pieces cut into consecutive runs of at most ``size`` bytes."""
    out: list[list[Backing]] = [[]]
    room = size
    for p in pieces:
        done = 0
        while done < p.length:
            if room == 0:
                out.append([])
                room = size
            n = min(room, p.length - done)
            out[-1].append(Backing(p.fd, p.file_offset + done, n, p.address + done, p.gpa + done))
            done += n
            room -= n
    return [c for c in out if c]


class VirtioMem:
    """Implements the vhost engine's ``Device`` for virtio-mem (device ID 24)."""

    device_id = vm.DEVICE_ID
    num_queues = 1  # "guest-request"
    features = int(vm.Feature.ACPI_PXM | vm.Feature.UNPLUGGED_INACCESSIBLE)
    max_request = vm.REQUEST_SIZE

    def __init__(
        self,
        geometry: Geometry,
        requested_size: int = 0,
        *,
        host: Host,
        limits: Limits | None = None,
        cgroup: CgroupProbe | None = None,
        headroom: HeadroomRule | None = None,
        prealloc: bool = False,
        publish: Publish = _no_events,
        memmap_reserve: int | None = None,
        memmap_rescue: int | None = DEFAULT_RESCUE_MARGIN,
        memmap_observe: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model = VirtioMemModel(geometry, 0)
        self.host = host
        self.limits = limits or Limits()
        self.cgroup = cgroup
        self.headroom = headroom or HeadroomRule()
        self.prealloc = prealloc
        self.publish = publish
        self.stats = Stats()
        self.placement = PlacementObserver()
        self.ceiling = MemmapCeiling()
        self.rollbacks = RollbackDetector()
        self.protection = Protection()
        self.protection.set_rescue_margin(memmap_rescue)
        # Off for a front-end that is not a Linux guest (the bench's, the toolkit's
        # non-writing Lab): the onlining stays unknown, so no ceiling, cap or rescue.
        self.observe_memmap = memmap_observe
        self.forced = False  # the operator forced the requested size past the ceiling
        self._config_changed = False  # requested changed on the request path: notify the driver
        self.clock = clock
        self.memory: Memory | None = None
        self._warned_generation: int | None = None
        self.set_memmap_reserve(memmap_reserve)
        self.check_requested_size(requested_size)
        self.model.set_requested_size(requested_size)

    # --- the engine's Device interface ------------------------------------------

    def set_features(self, features: int) -> None:
        if not features & vm.Feature.UNPLUGGED_INACCESSIBLE:
            log.warning("driver did not accept UNPLUGGED_INACCESSIBLE: it may read unplugged memory")

    def read_config(self, offset: int, size: int) -> bytes | None:
        if offset + size > vm.CONFIG_SIZE:
            return None
        return self.model.config().pack()[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        raise PeerError("SET_CONFIG refused: virtio-mem config space is read-only")

    def rings_enabled(self) -> None:
        self.check_backing()

    def attach(self, memory: Memory | None) -> None:
        """Borrow the attached front-end's memory (None when it leaves)."""
        self.memory = memory

    # --- sizes and limits (operator) ---------------------------------------------

    @property
    def geometry(self) -> Geometry:
        return self.model.geometry

    @property
    def plugged_size(self) -> int:
        return self.model.plugged_size

    @property
    def requested_size(self) -> int:
        return self.model.requested_size

    def check_requested_size(self, size: int) -> None:
        """Raise ConfigError with the reason if ``size`` may not be requested."""
        self.model.check_requested_size(size)
        max_ = self.limits.memory_max
        if max_ is not None and size > max_:
            raise ConfigError(f"requested size {format_size(size)} is above {MEMORY_MAX} "
                              f"({format_size(max_)})")

    def resize(self, requested_size: int, *, reason: str = "operator", force: bool = False) -> bool:
        """Set requested_size; True when config space changed (notify the driver).

        Raises ConfigError with the reason, also when the size is above the
        memmap ceiling of a guest seen onlining movable (unless ``force``).
        """
        self.check_requested_size(requested_size)
        if not force:
            problem = self.ceiling.refusal(requested_size, self.model.requested_size, self.boot_memory(),
                                           self.placement.onlining, self.model.block_size)
            if problem:
                raise ConfigError(problem)
        if force or requested_size > self.model.requested_size:
            self.forced = force  # lowering keeps what the operator decided about the ceiling
        changed = self.model.set_requested_size(requested_size)
        if changed:
            self.rollbacks.requested_changed()
        m = self.model
        log.info("requested size set to %s by %s (usable %s, plugged %s)%s",
                 format_size(requested_size), reason, format_size(m.usable_region_size),
                 format_size(m.plugged_size), "" if changed else ", unchanged")
        return changed

    def set_limit(self, name: str, value: int | None) -> bool:
        """memory.max / memory.high (None: no limit); True when config space changed."""
        self.limits.set(name, value, self.model.block_size)
        changed = False
        if name == MEMORY_MAX and value is not None and self.model.requested_size > value:
            # The guest is asked to give back what is above the new maximum.
            changed = self.resize(value, reason=MEMORY_MAX)
        log.info("%s set to %s", name, "max" if value is None else format_size(value))
        self.publish("LIMIT_CHANGED", name=name, value=value)
        if name == MEMORY_HIGH:
            changed |= self.enforce_memory_high()
        return changed

    def enforce_memory_high(self) -> bool:
        """Above memory.high, ask the guest to shrink; never unplug behind its back.

        True when config space changed. Raises OSError if the host cannot be read.
        """
        high = self.limits.memory_high
        if high is None:
            return False
        fp = self.footprint()
        if fp is None or fp.allocated <= high:
            return False
        target = min(self.model.requested_size, high - high % self.model.block_size)
        if target >= self.model.requested_size:
            return False
        changed = self.resize(target, reason=MEMORY_HIGH)
        self.publish("MEMORY_HIGH_EXCEEDED", footprint=fp.allocated, high=high, requested=target)
        return changed

    def set_memmap_reserve(self, reserve: int | None) -> None:
        """The boot memory a movable-onlining guest keeps (None: the default)."""
        if reserve is not None and (isinstance(reserve, bool) or not isinstance(reserve, int)
                                    or reserve < 0):
            raise ConfigError(f"memmap reserve {reserve!r} must be a non-negative size")
        self.ceiling.reserve = reserve
        if reserve is not None:
            log.info("memmap reserve set to %s", format_size(reserve))

    def set_memmap_rescue(self, margin: int | None) -> None:
        """Kernel memory the rescue gives back to a failing guest (None: rescue off)."""
        self.protection.set_rescue_margin(margin)
        log.info("memmap rescue %s", "off" if margin is None else f"margin set to {format_size(margin)}")

    def take_config_change(self) -> bool:
        """True once after a request made the device change its config itself
        (the cap or the rescue): the caller notifies the driver."""
        changed, self._config_changed = self._config_changed, False
        return changed

    # --- accounting ------------------------------------------------------------------

    def region_pieces(self) -> list[Backing] | None:
        """The fd pieces behind the device region; None when it is not shared (yet)."""
        memory = self.memory
        g = self.geometry
        if memory is None:
            return None
        try:
            return memory.backing(g.addr, g.region_size)
        except GuestMemoryError:
            return None

    def footprint(self) -> Footprint | None:
        """What the host holds for the region; None when it is not shared (yet)."""
        pieces = self.region_pieces()
        return None if pieces is None else footprint(self.model, self.host, pieces)

    def reclaim_unplugged(self) -> int:
        """Give back host memory held for unplugged blocks (a successor's: a
        populate or discard the dead process left half done); bytes given
        back. Every run of unplugged blocks is discarded, found or not (a
        fallocate()d page is invisible to SEEK_DATA); plugged blocks are never
        touched, and the guest has no ACK for the others, so it holds nothing
        there. Raises OSError or HostError."""
        pieces = self.region_pieces()
        if pieces is None:
            return 0
        assert self.memory is not None
        before = sum(self.host.allocated(p) for p in pieces)
        bs, base, plugged = self.geometry.block_size, self.geometry.addr, 0
        unplugged: list[tuple[int, int]] = []
        for first, n in self.model.bitmap.runs():  # runs of plugged blocks
            if first > plugged:
                unplugged.append((plugged, first - plugged))
            plugged = first + n
        if plugged < self.geometry.nblocks:
            unplugged.append((plugged, self.geometry.nblocks - plugged))
        self.host.discard([piece for first, n in unplugged
                           for piece in self.memory.backing(base + first * bs, n * bs)])
        return before - sum(self.host.allocated(p) for p in pieces)

    def boot_memory(self) -> int | None:
        """The guest's memory outside the device region (None: no front-end)."""
        memory = self.memory
        return None if memory is None else boot_memory([(p.gpa, p.length) for p in memory.all_backing()], self.geometry)

    def memmap_status(self) -> dict[str, Any]:
        report = memmap_report(self.model, self.placement)
        report.update(self.ceiling.report(self.boot_memory(), self.placement.onlining, self.model.block_size))
        report["forced"] = self.forced
        report["protection"] = self.protection.to_json()
        return report

    def status(self) -> dict[str, Any]:
        m = self.model
        g = self.geometry
        fp = self.footprint()
        return {
            "geometry": {"addr": g.addr, "region_size": g.region_size, "block_size": g.block_size,
                         "node_id": g.node_id},
            "plugged_size": m.plugged_size,
            "requested_size": m.requested_size,
            "usable_region_size": m.usable_region_size,
            "backed": fp is not None,
            "limits": self.limits.to_json(),
            "cgroup": self.cgroup.path if self.cgroup else None,
            "prealloc": self.prealloc,
            "host_allocated": fp.allocated if fp else None,
            "memmap": self.memmap_status(),
            "hot_add_failures": self.rollbacks.to_json(),
        }

    def accounting(self) -> dict[str, Any]:
        fp = self.footprint()
        return {
            "plugged_size": self.model.plugged_size,
            "plugged_ranges": [list(r) for r in self.model.plugged_ranges()],
            "host_allocated": fp.allocated if fp else None,
            "allocated_extents": [list(e) for e in fp.extents] if fp else None,
            "allocated_outside_plugged": fp.outside_plugged if fp else None,
            "memmap": self.memmap_status(),
        }

    def limits_report(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.limits.to_json())
        if self.cgroup is not None:
            out["cgroup"] = {"version": self.cgroup.version, **self.assess_cgroup(self.cgroup).to_json()}
        return out

    def unallocated(self) -> Unallocated:
        """Guest RAM the host has not allocated yet: the guest may write it at
        any moment, and it is charged then. Raises OSError."""
        g = self.geometry
        memory = self.memory
        pieces = self.region_pieces()
        if memory is None or pieces is None:
            return Unallocated(self.model.plugged_size, 0)
        plugged = self.model.plugged_size - sum(self.host.allocated(p) for p in pieces)
        other = sum(p.length - self.host.allocated(p) for p in memory.all_backing()
                    if p.gpa + p.length <= g.addr or p.gpa >= g.addr + g.region_size)
        return Unallocated(max(plugged, 0), max(other, 0))

    def assess_cgroup(self, cgroup: CgroupProbe, size: int = 0,
                      unallocated: Unallocated | None = None) -> Assessment:
        """Raises OSError if the cgroup or the region cannot be read."""
        if unallocated is None:
            unallocated = self.unallocated()
        return self.headroom.assess(cgroup.path, cgroup.read(), unallocated, size)

    # --- backing -----------------------------------------------------------------------

    def device_backing(self, gpa: int, size: int) -> list[Backing] | None:
        """The fd pieces behind a device range, or None (logged once per table) when unshared."""
        memory = self.memory
        try:
            if memory is None:
                raise GuestMemoryError("no memory table from the front-end yet")
            return memory.backing(gpa, size)
        except GuestMemoryError as exc:
            generation = memory.generation if memory else None
            if self._warned_generation != generation:
                self._warned_generation = generation
                g = self.geometry
                log.error("device region %#x+%s is not backed by shared memory from the front-end "
                          "(%s): plugs are answered BUSY; %s",
                          g.addr, format_size(g.region_size), exc, MISSING_BACKING_HINT)
            return None

    def check_backing(self) -> bool:
        """Logs once per memory table if the region is unshared."""
        return self.device_backing(self.geometry.addr, self.geometry.region_size) is not None

    # --- guest requests -----------------------------------------------------------------

    def begin(self, data: bytes, writable: int) -> bytes | HostWork:
        """One request's response, or the host work it needs first.

        A malformed request (short, unknown type, no room for the response)
        is a driver bug: logged, answered with b"" (returned unused).
        """
        started = time.perf_counter()
        request = self._parse(data, writable)
        if request is None:
            return b""
        decision = self.model.decide(request)
        if isinstance(decision, Answer):
            response = decision.response
            if response.type == ResponseType.NACK:
                self.stats.nacks_by_reason["requested"] += 1
            return self._done(request.type, response.pack(), started)
        if isinstance(decision, Plug):
            return self._plug(decision, started)
        if isinstance(decision, Unplug):
            return self._host_work(decision, False, decision.addr, decision.size, started)
        g = self.geometry
        if decision.plugged_size == 0 and self.device_backing(g.addr, g.region_size) is None:
            return self._commit(decision, started)  # nothing plugged, nothing to give back
        return self._host_work(decision, False, g.addr, g.region_size, started)

    def finish(self, work: HostWork, error: HostError | None) -> bytes:
        """The response once the host work ran: ACK and commit, or BUSY."""
        if isinstance(error, HeadroomExhausted):
            log.warning("preallocating %#x+%s stopped and rolled back, answering BUSY: %s",
                        work.gpa, format_size(work.size), error)
            return self._busy("cgroup", work.kind, work.gpa, work.size, work.started, str(error))
        if error is not None:
            what = "preallocating" if work.populate else "discarding"
            log.error("%s %#x+%s failed, answering BUSY: %s", what, work.gpa, format_size(work.size), error)
            reason = "prealloc-failed" if work.populate else "discard-failed"
            return self._busy(reason, work.kind, work.gpa, work.size, work.started,
                              "" if work.populate else str(error))
        d = work.decision
        if work.populate:
            self.stats.bytes_preallocated += work.size
        else:
            self.stats.bytes_discarded += d.plugged_size if isinstance(d, UnplugAll) else work.size
        return self._commit(d, work.started)

    def _parse(self, data: bytes, writable: int) -> MemRequest | None:
        if len(data) < vm.REQUEST_SIZE:
            problem = f"request is {len(data)} bytes, shorter than {vm.REQUEST_SIZE}"
        elif writable < vm.RESPONSE_SIZE:
            problem = (f"writable space is {writable} bytes, shorter than the "
                       f"{vm.RESPONSE_SIZE}-byte response")
        else:
            request = MemRequest.unpack(data)
            if request.type in _REQUEST_NAMES:
                return request
            problem = f"unknown request type {request.type}"
        log.error("guest driver bug: %s; returned unused, nothing done", problem)
        return None

    def _plug(self, decision: Plug, started: float) -> bytes | HostWork:
        addr, size = decision.addr, decision.size
        max_ = self.limits.memory_max
        if max_ is not None and self.model.plugged_size + size > max_:
            detail = f"would exceed {MEMORY_MAX} {format_size(max_)}"
            log.info("PLUG %#x+%s NACKed: %s", addr, format_size(size), detail)
            self.stats.nacks_by_reason[MEMORY_MAX] += 1
            self.publish("PLUG_NACKED", reason=MEMORY_MAX, detail=detail, addr=addr, size=size)
            return self._done(RequestType.PLUG, _NACK, started)
        guard: Guard | None = None
        if self.cgroup is not None:
            cgroup = self.cgroup
            try:
                assessment = self.assess_cgroup(cgroup, size)
            except OSError as exc:
                log.error("cannot read cgroup %s, answering BUSY: %s", cgroup.path, exc)
                return self._busy("cgroup-unreadable", "PLUG", addr, size, started, str(exc))
            if not assessment.fits:
                # BUSY, not NACK: Linux takes a NACK as "config changed" and re-sends the
                # PLUG at once, spinning while requested_size stays above plugged_size.
                reason = assessment.reason()
                log.warning("PLUG %#x+%s refused (BUSY): %s", addr, format_size(size), reason)
                return self._busy("cgroup", "PLUG", addr, size, started, reason)
            unallocated = assessment.unallocated

            def guard(chunk: int) -> str | None:
                # Runs on the worker thread: the cgroup only, model figures as decided.
                try:
                    check = self.headroom.assess(cgroup.path, cgroup.read(), unallocated, chunk)
                except OSError as exc:
                    return f"cannot read cgroup {cgroup.path}: {exc}"
                return None if check.fits else check.reason()
        if not self.prealloc:
            if self.device_backing(addr, size) is None:
                return self._busy("region-not-shared", "PLUG", addr, size, started)
            return self._commit(decision, started)
        return self._host_work(decision, True, addr, size, started, guard)

    def _host_work(self, decision: Plug | Unplug | UnplugAll, populate: bool, gpa: int, size: int,
                   started: float, guard: Guard | None = None) -> bytes | HostWork:
        pieces = self.device_backing(gpa, size)
        work = HostWork(decision, populate, pieces or [], gpa, size, started, guard)
        if pieces is None:
            return self._busy("region-not-shared", work.kind, gpa, size, started)
        return work

    def _commit(self, decision: Plug | Unplug | UnplugAll, started: float) -> bytes:
        m = self.model
        opened = isinstance(decision, Plug) and opens_memory_blocks(m, decision.addr, decision.size)
        plugged_before = m.plugged_size
        response = m.commit(decision).pack()
        self._observe(decision, opened, plugged_before)
        kind = (RequestType.PLUG if isinstance(decision, Plug) else RequestType.UNPLUG
                if isinstance(decision, Unplug) else RequestType.UNPLUG_ALL)
        if m.plugged_size == m.requested_size:
            self.publish("REQUESTED_REACHED", plugged=m.plugged_size)
        return self._done(kind, response, started)

    # --- what the guest's requests tell about its memmap ---------------------------------

    def _observe(self, decision: Plug | Unplug | UnplugAll, opened: bool, plugged_before: int) -> None:
        now = self.clock()
        if isinstance(decision, Plug):
            self.rollbacks.plugged(decision.addr, decision.size, opened, now)
            # Every earlier memory block is added and onlined by now. With
            # --prealloc plugged blocks are allocated already: a memmap put in
            # them adds nothing, so the placement cannot be seen (stays unknown).
            if opened and not self.prealloc and self.observe_memmap:
                allocated = self._region_allocated()
                if allocated is not None:
                    self.placement.movable_after = movable_after(self.boot_memory())
                    self.placement.sample(memory_blocks_used(self.model), allocated)
                self._cap()
            return
        if isinstance(decision, UnplugAll):
            self.placement.reset()
            self.rollbacks.unplugged_all()
            return
        self.placement.interrupted()
        m = self.model
        rollback = self.rollbacks.unplugged(decision.addr, decision.size, plugged_before,
                                            m.requested_size, now)
        if rollback is None:
            return
        self.stats.hot_add_failures += 1
        log.warning("the guest rolled back %#x+%s %.0f ms after plugging it (%d time(s) for requested "
                    "%s, plugged %s): %s", rollback.addr, format_size(rollback.size),
                    rollback.seconds * 1000, rollback.count, format_size(m.requested_size),
                    format_size(m.plugged_size), rollback.to_json()["cause"])
        self.publish("HOT_ADD_FAILED", **rollback.to_json(), onlining=self.placement.onlining,
                     requested=m.requested_size, plugged=m.plugged_size)
        self._rescue()

    def _lower_requested(self, target: int) -> None:
        """Set requested from the request path; the driver is notified after the request."""
        if self.model.set_requested_size(target):
            self.rollbacks.requested_changed()
            self._config_changed = True

    def _cap(self) -> None:
        """A guest seen onlining movable, asked above its ceiling unforced: stop it there."""
        m = self.model
        boot = self.boot_memory()
        if boot is None:
            return
        ceiling = self.ceiling.ceiling(boot, m.block_size)
        target = cap_target(m.requested_size, m.plugged_size, ceiling, self.placement.onlining, self.forced)
        if target is None:
            return
        before = m.requested_size
        self._lower_requested(target)
        done = self.protection.capped(before, target, ceiling, boot, self.ceiling.reserve_for(boot))
        log.warning("memmap ceiling: %s", done["reason"])
        self.publish("MEMMAP_CEILING_APPLIED", **done)

    def _rescue(self) -> None:
        """After a rollback: ask the guest to remove enough movable blocks to live on."""
        m = self.model
        margin = self.protection.rescue_margin
        if margin is None or not rescue_applies(self.placement.onlining):
            return
        target = rescue_target(m.plugged_size, margin, self.geometry)
        if target >= m.requested_size:
            return
        before = m.requested_size
        self._lower_requested(target)
        done = self.protection.rescued(before, target, m.plugged_size, margin)
        log.warning("memmap rescue: %s", done["reason"])
        self.publish("MEMMAP_RESCUE", **done)

    def _region_allocated(self) -> int | None:
        """The host allocation of the device region, or None when it cannot be read."""
        pieces = self.region_pieces()
        if pieces is None:
            return None
        try:
            return sum(self.host.allocated(piece) for piece in pieces)
        except OSError as exc:
            log.debug("cannot measure the region for the memmap observation: %s", exc)
            return None

    def _busy(self, reason: str, kind: str, gpa: int, size: int, started: float,
              detail: str = "") -> bytes:
        self.stats.busy_by_reason[reason] += 1
        self.publish("BUSY", request=kind, reason=reason, detail=detail, addr=gpa, size=size)
        return self._done(RequestType[kind], _BUSY, started)

    def _done(self, kind: int, response: bytes, started: float) -> bytes:
        self.stats.record(_REQUEST_NAMES[kind], _RESPONSE_NAMES[response[0]],
                          time.perf_counter() - started)
        return response

