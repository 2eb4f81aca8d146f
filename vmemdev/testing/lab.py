"""A synchronous test lab: a real `vmemdev serve` process, a QEMU-like front-end
and a simulated Linux guest, for host-side memory-accounting tests.

    with Lab(region_size="1G") as lab:
        lab.resize("256M")                  # waits until the guest has plugged it
        assert lab.allocated() <= lab.plugged()
        assert_allocation_within_plugged(lab)

The daemon runs as its own process (so its cgroup and its charges are its
own); the front-end and the guest run in a background thread with their own
Trio loop, holding the guest RAM and the device region as memfds in this
process, so the test can read the host's view of them directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

import trio

from ..client import Client
from ..closing import Closing
from ..errors import HostError
from ..host import probes
from ..sizes import parse_size
from .frontend import Frontend
from .guest import SimulatedLinuxGuest


def _size(value) -> int:
    return value if isinstance(value, int) else parse_size(value)


class LabError(HostError):
    """The lab's daemon process or simulated guest did not do what was asked."""


class Lab(Closing):
    def __init__(self, region_size="1G", block_size="2M", region_addr=0x1_0000_0000,
                 daemon_args: tuple[str, ...] = (), guest_touches: bool = True,
                 cgroup_procs: str | None = None, startup_timeout: float = 20.0):
        self.region_size = _size(region_size)
        self.block_size = _size(block_size)
        self.region_addr = region_addr
        self.guest_touches = guest_touches
        self._dir = tempfile.TemporaryDirectory(prefix="vmemdev-lab-")
        self.socket_path = os.path.join(self._dir.name, "vm0.sock")
        self.control_path = os.path.join(self._dir.name, "vm0.ctl")
        self.log_path = os.path.join(self._dir.name, "daemon.log")
        self._log = open(self.log_path, "w")
        self._frontend: Frontend | None = None

        def enter_cgroup():
            if cgroup_procs:
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))

        # A guest that does not write what it plugs looks, to the memmap observer,
        # like a Linux guest onlining movable with no kernel memory to spare:
        # the memmap cap and rescue are for real guests, not for this one.
        not_linux = () if guest_touches else ("--memmap-observe", "off")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vmemdev", "serve", "--socket-path", self.socket_path,
             "--region-addr", hex(region_addr), "--region-size", str(self.region_size),
             "--block-size", str(self.block_size), *not_linux, *daemon_args],
            stderr=self._log, preexec_fn=enter_cgroup if cgroup_procs else None)
        deadline = time.monotonic() + startup_timeout
        while not os.path.exists(self.control_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"vmemdev serve did not start: {self.daemon_log()}")
            time.sleep(0.02)
        self.ctl = Client(self.control_path)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_guest, daemon=True)
        self._thread.start()
        if not self._ready.wait(startup_timeout) or self._error:
            self.close()
            raise LabError(f"the front-end did not attach: {self._error!r}")

    # --- the guest side, in its own thread and Trio loop ----------------------

    def _run_guest(self) -> None:
        try:
            trio.run(self._guest_main)
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _guest_main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        fe = self._frontend = Frontend(self.socket_path, device_addr=self.region_addr,
                                       device_size=self.region_size)
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            await fe.realize()
            nursery.start_soon(fe.watch_backend_channel)
            await fe.start()
            self.guest = SimulatedLinuxGuest(fe, touch=self.guest_touches)
            await nursery.start(self.guest.run)
            self._ready.set()
        await fe.close()

    @property
    def frontend(self) -> Frontend:
        """The simulated QEMU (until ``close_guest``)."""
        if self._frontend is None:
            raise LabError("the guest is not attached")
        return self._frontend

    # --- what tests call -------------------------------------------------------

    def resize(self, size, wait: bool = True, timeout: float = 60.0) -> None:
        """Ask for ``size``; with ``wait``, return once the guest has plugged exactly that."""
        target = _size(size)
        self.ctl.execute("resize", size=target)
        if not wait:
            return
        deadline = time.monotonic() + timeout
        # Done when the guest itself holds the target (and has written to it).
        while self.plugged() != target or self.guest_plugged() != target:
            if time.monotonic() > deadline:
                raise LabError(f"guest stuck at {self.plugged()} of {target}; "
                               f"stats {self.ctl.execute('query-stats')}")
            time.sleep(0.01)

    def set_limit(self, name: str, value) -> dict:
        return self.ctl.execute("set-limit", name=name, value=value)

    def status(self) -> dict:
        return self.ctl.execute("query-status")

    def accounting(self) -> dict:
        return self.ctl.execute("query-accounting")

    def plugged(self) -> int:
        return self.status()["plugged_size"]

    def guest_plugged(self) -> int:
        """What the simulated guest believes it has plugged (and has written to)."""
        return trio.from_thread.run_sync(lambda: len(self.guest.plugged) * self.block_size,
                                         trio_token=self._token)

    def allocated(self) -> int:
        """Host bytes allocated for the device region (the DIMM memfd's st_blocks)."""
        return probes.allocated_bytes(self.frontend.ram.dimm_file())

    def extents(self) -> list[tuple[int, int]]:
        """Allocated (guest-physical address, length) extents of the device region."""
        return [(self.region_addr + off, n) for off, n in probes.data_extents(self.frontend.ram.dimm_file())]

    def guest_check_contents(self) -> None:
        """Every block the guest plugged still holds what it wrote there."""
        trio.from_thread.run_sync(self.guest.check_contents, trio_token=self._token)

    def daemon_log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def close_guest(self) -> None:
        """Detach the simulated QEMU and guest (the daemon keeps running)."""
        if getattr(self, "_token", None) is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(10)
        if self._frontend is not None:
            self._frontend.release()
            self._frontend = None
            # The daemon serves one front-end at a time: wait until it saw this one go.
            deadline = time.monotonic() + 10
            while self.process.poll() is None and self.status()["frontend"] != "waiting":
                if time.monotonic() > deadline:
                    raise LabError("the daemon still reports the front-end attached")
                time.sleep(0.01)

    def close(self) -> None:
        self.close_guest()
        if hasattr(self, "ctl"):
            self.ctl.close()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._log.close()
        self._dir.cleanup()
