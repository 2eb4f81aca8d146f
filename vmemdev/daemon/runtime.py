"""One virtio-mem device in the daemon: wires the device, the host, events and
the attached front-end, and owns nothing else.

The device (``virtio_mem.VirtioMem``) outlives front-end connections: a
restarted VM reconnects to the same bitmap and sizes. The runtime runs the
host work a request needs (on the connection's thread, without the device
lock), forwards config changes to the attached front-end, and watches
memory.high.

``lock`` is the device lock: the attached connection's thread and the
control plane (Trio) each hold it while they use the device.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import trio

from .. import __version__
from ..errors import HostError, OperatorError
from ..host.interface import CgroupProbe
from ..host.system import SystemHost
from ..vhost.engine import MAX_MEM_SLOTS, RingRequest
from ..vhost.snapshot import StateError, restore
from ..virtio_mem.device import VirtioMem
from ..virtio_mem.headroom import HeadroomRule
from ..virtio_mem.limits import Limits
from ..virtio_mem.model import Geometry
from ..virtio_mem.protection import DEFAULT_RESCUE_MARGIN
from . import handover, keeper
from .connection import FrontendConnection
from .events import EventBus
from .keeper import ConnectionKeeper, Persistence, Restores, SavedAnswer, SavedState

log = logging.getLogger(__name__)


class DeviceRuntime:
    def __init__(self, geometry: Geometry, requested_size: int = 0, *, limits: Limits | None = None,
                 cgroup: CgroupProbe | None = None, headroom: HeadroomRule | None = None,
                 prealloc: bool = False, memmap_reserve: int | None = None,
                 memmap_rescue: int | None = DEFAULT_RESCUE_MARGIN, memmap_observe: bool = True,
                 state_file: str | None = None):
        self.events = EventBus()
        self.lock = threading.Lock()
        self.host = SystemHost()
        self.device = VirtioMem(geometry, requested_size, host=self.host, limits=limits, cgroup=cgroup,
                                headroom=headroom, prealloc=prealloc, publish=self.events.publish,
                                memmap_reserve=memmap_reserve, memmap_rescue=memmap_rescue,
                                memmap_observe=memmap_observe)
        self.frontend: FrontendConnection | None = None
        self.sessions_ended = 0  # front-end connections served to the end
        self.state_file = state_file  # keep the attached connection resumable (keeper.py)
        self.restores: Restores | None = None  # how often the attached connection was resumed (keeper.py)
        self.started = time.time()
        self.argv: list[str] | None = None  # this program's arguments, for an upgrade in place
        self.listener_fd: int | None = None  # the vhost-user listening socket, for an upgrade
        self._upgrading = False

    @property
    def geometry(self) -> Geometry:
        return self.device.geometry

    @property
    def frontend_attached(self) -> bool:
        return self.frontend is not None

    # --- front-end connections ----------------------------------------------------

    def connect(self, sock: trio.socket.SocketType, tracer: Any = None) -> FrontendConnection:
        """The connection for a newly accepted front-end; the device borrows its memory."""
        memory = self.host.guest_memory(MAX_MEM_SLOTS)
        self.frontend = FrontendConnection(sock, self.device, memory, self.serve_request, lock=self.lock,
                                           tracer=tracer, persistence=self._persistence())
        with self.lock:
            self.device.attach(memory)
        return self.frontend

    def _persistence(self, answer: SavedAnswer | None = None) -> Persistence | None:
        if self.state_file is None:
            return None
        model = self.device.model
        return Persistence(ConnectionKeeper(self.state_file), record=model.to_record, answer=answer)

    def resume(self, state: SavedState, fds: dict[str, int], tracer: Any = None,
               reason: str = "restart") -> FrontendConnection:
        """The connection a dead process was serving, from its saved state and
        the fds the service manager kept. Raises StateError (nothing kept then)."""
        persistence = self._persistence(state.answer)
        assert persistence is not None  # resumed from a state file
        keeper_ = persistence.keeper
        try:
            names = state.entry_names(fds)
            keeper_.inflight.read()  # the message in flight: the connection finishes it
        except StateError as exc:
            raise StateError(f"{self.state_file}: {exc}") from exc
        keeper_.adopt(fds, names)
        fds = keeper_.fds.resolve(fds)  # by role
        missing = [f"mem{i}" for i in range(len(state.engine.regions)) if f"mem{i}" not in fds]
        if missing:
            raise StateError(f"{self.state_file}: names no fd store entry for {', '.join(missing)}")
        with self.lock:
            try:
                self.device.model.restore(state.device)
            except ValueError as exc:
                raise StateError(f"{self.state_file}: {exc}") from exc
            memory = self.host.guest_memory(MAX_MEM_SLOTS)
            regions = [fds[f"mem{i}"] for i in range(len(state.engine.regions))]
            engine = restore(self.device, memory, state.engine, regions)
            sock = socket.socket(fileno=fds["conn"])
            self.frontend = FrontendConnection(sock, self.device, memory, self.serve_request, lock=self.lock,
                                               tracer=tracer, engine=engine, persistence=persistence)
            before = state.restores.count if state.restores is not None else 0
            self.restores = Restores(before + 1, time.time(), reason)
            self.frontend.adopt_fds(fds)
            keeper_.restores = self.restores  # saved with the next save
            self.device.attach(memory)
            try:
                reclaimed = self.device.reclaim_unplugged()
            except (OSError, HostError) as exc:
                log.error("cannot give back memory held for unplugged blocks: %s", exc)
            else:
                if reclaimed:
                    log.warning("gave back %d bytes the dead process left allocated in unplugged blocks",
                                reclaimed)
        d = self.device
        if reason == "upgrade":
            log.warning("upgraded in place: resumed the front-end connection (resume %d), plugged %d, "
                        "requested %d", self.restores.count, d.plugged_size, d.requested_size)
        else:
            log.warning("resumed the front-end connection of a process that died (resume %d): plugged %d, "
                        "requested %d", self.restores.count, d.plugged_size, d.requested_size)
        self.events.publish("CONNECTION_RESUMED", plugged=d.plugged_size, requested=d.requested_size,
                            reason=reason, count=self.restores.count)
        return self.frontend

    def disconnected(self) -> None:
        self.frontend = None
        with self.lock:
            self.device.attach(None)
        self.sessions_ended += 1

    def serve_request(self, request: RingRequest) -> bytes:
        """The response to one ring request; called on the connection's thread
        with the device lock held, which is let go while host work runs."""
        step = self.device.begin(request.data, request.writable)
        if not isinstance(step, bytes):
            self.lock.release()
            try:
                error = step.run(self.host)
            finally:
                self.lock.acquire()
            step = self.device.finish(step, error)
        if self.device.take_config_change():  # the memmap cap or rescue lowered requested
            self._notify_locked()
        return step

    # --- operator API (control socket) ----------------------------------------------

    def resize(self, requested_size: int, *, reason: str = "operator", force: bool = False) -> dict[str, Any]:
        """Raises ConfigError with the reason; notifies the driver once if config
        changed. Returns the device as the resize left it, read under the same
        lock (the guest may act on it before a second look)."""
        with self.lock:
            changed = self.device.resize(requested_size, reason=reason, force=force)
            after = {"requested_size": self.device.requested_size, "changed": changed,
                     "hot_add_failures": self.device.rollbacks.total}
            if changed:
                self._save_locked()
        if changed:
            self.notify_config_change()
        return after

    def set_limit(self, name: str, value: int | None) -> None:
        with self.lock:
            changed = self.device.set_limit(name, value)
            if changed:
                self._save_locked()
        if changed:
            self.notify_config_change()

    def _save_locked(self) -> None:
        """Save a config change under the lock that made it: a config read
        (GET_CONFIG) cannot show the driver a size a restart would forget."""
        if self.frontend is not None:
            self.frontend.persist()

    def notify_config_change(self) -> None:
        """Tell the driver the config changed; the caller saved the change
        (``_save_locked``) before it let go of the lock."""
        frontend = self.frontend
        if frontend is None:
            log.info("no front-end attached: the driver reads the new config when it probes")
        else:
            frontend.notify_config_change()
        with self.lock:
            d = self.device.model
            sizes = dict(requested=d.requested_size, usable=d.usable_region_size, plugged=d.plugged_size)
        self.events.publish("CONFIG_CHANGE_SENT", **sizes, delivered=frontend is not None)

    def _notify_locked(self) -> None:
        """The same, from the connection's thread with the device lock held: the
        notification goes out from its poll loop once the request is answered."""
        frontend = self.frontend
        if frontend is not None:
            frontend.notify_config_change()
        d = self.device.model
        self.events.publish("CONFIG_CHANGE_SENT", requested=d.requested_size, usable=d.usable_region_size,
                            plugged=d.plugged_size, delivered=frontend is not None)

    def status(self) -> dict[str, Any]:
        with self.lock:
            out = self.device.status()
        out["frontend"] = "attached" if self.frontend_attached else "waiting"
        out["pid"] = os.getpid()
        r = self.restores if self.frontend is not None else None  # the attached connection's
        out["resumed"] = {"count": 0, "last": None, "by": None} if r is None else r.to_json()
        out["started"] = self.started
        return out

    # --- upgrade in place (handover.py) ----------------------------------------------

    async def prepare_upgrade(self, park_timeout: float = 10.0) -> dict[str, Any]:
        """Check that the installed version starts and reads our state, then park
        the attached connection (state saved, nothing in flight). Raises
        OperatorError with the reason; nothing has changed then."""
        if self._upgrading:
            raise OperatorError("an upgrade is already in progress")
        if self.argv is None or self.listener_fd is None:
            raise OperatorError("this process was not started by `vmemdev serve`: nothing to re-execute")
        if self.frontend is not None and self.state_file is None:
            raise OperatorError("a front-end is attached and serve has no --state-file: its connection "
                                "could not be resumed (restart with --state-file PATH to upgrade in place)")
        self._upgrading = True
        try:
            try:
                found = await handover.preflight()
            except OSError as exc:
                raise OperatorError(f"not upgraded: {exc}") from exc
            if keeper.FORMAT not in found["state-formats"]:
                raise OperatorError(f"not upgraded: the installed vmemdev {found['version']} reads state formats "
                                    f"{found['state-formats']}, this one writes {keeper.FORMAT}")
            frontend = self.frontend
            if frontend is not None and not await trio.to_thread.run_sync(frontend.park, park_timeout):
                raise OperatorError(f"not upgraded: the connection did not come to a stop within {park_timeout:.0f} s "
                                    "(or it ended)")
        except BaseException:
            self._upgrading = False
            raise
        return {"pid": os.getpid(), "from": __version__, "to": found["version"],
                "frontend": "attached" if self.frontend is not None else "waiting"}

    def upgrade(self) -> None:
        """Re-execute the installed version (never returns)."""
        assert self._upgrading and self.argv is not None and self.listener_fd is not None
        with self.lock:
            fds = {"vhost-user": self.listener_fd}
            p = self.frontend.persistence if self.frontend is not None else None
            if p is not None:  # by fd store entry, as a restart gets them
                fds.update(p.keeper.fds.entries())
            self.events.publish("UPGRADE_STARTED", pid=os.getpid())
            handover.reexec(self.argv, fds)

    async def monitor(self, interval: float = 1.0, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Watch memory.high; runs for the daemon's life."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            try:
                with self.lock:
                    changed = self.device.enforce_memory_high()
                    if changed:
                        self._save_locked()
                if changed:
                    self.notify_config_change()
            except OSError as exc:
                log.warning("cannot measure the device footprint: %s", exc)
