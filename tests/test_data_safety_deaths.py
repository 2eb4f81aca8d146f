"""Data safety when the serving process dies (issue 12, part 9).

The data-safety state machine (test_data_safety.py) with one more actor: the
serving process dies, by kill -9 between requests or at a crash point inside
one (``answer-saved``: decided and saved, not yet published;
``host-work-done``: a discard or populate done, the state not yet changed).
The daemon runs as the README says, ``vmemdev hold -- vmemdev serve
--state-file``, in its own processes; the front-end keeps its connection and
ring across every death, as QEMU does. Every answer must be the one the
reference model expects, as if nobody had died; after every step plugged =
the model's blocks, host data only in plugged blocks, and what the guest
wrote into each plugged block unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from vmemdev.client import Client
from vmemdev.errors import VmemdevError
from vmemdev.testing.frontend import Frontend
from vmemdev.testing.processes import only_child

from .test_data_safety import NBLOCKS, A, B, DataSafety

POINTS = ("answer-saved", "host-work-done")
MAX_DEATHS = 3  # per sequence: `hold` backs off after quick deaths (0.1, 0.2, 0.4 s)
VMEMDEV = [sys.executable, "-m", "vmemdev"]


class HeldDevice:
    """`vmemdev hold -- vmemdev serve --state-file` and a front-end on a Trio thread."""

    def __init__(self, *serve_args: str):
        self.dir = tempfile.TemporaryDirectory(prefix="vmemdev-deaths-")
        d = self.dir.name
        self.sock, self.ctl_path = os.path.join(d, "vm.sock"), os.path.join(d, "vm.ctl")
        self.markers = os.path.join(d, "crash")
        os.mkdir(self.markers)
        for point in POINTS:  # disarmed: a point fires once its marker is removed
            open(os.path.join(self.markers, point), "w").close()
        self.log = open(os.path.join(d, "hold.log"), "w")
        self.proc = subprocess.Popen(
            VMEMDEV + ["hold", "--", *VMEMDEV, "serve", "--socket-path", self.sock,
                       "--state-file", os.path.join(d, "vm.state"), "--region-addr", f"{A:#x}",
                       "--region-size", f"{NBLOCKS * 2}M", "--block-size", "2M", *serve_args],
            stderr=self.log, env=dict(os.environ, VMEMDEV_CRASH_POINT=f"*:{self.markers}"))
        self._ready = threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._main, daemon=True).start()
        if not self._ready.wait(30) or self._error:
            self.close()
            raise RuntimeError(f"the front-end did not attach: {self._error!r}")

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.fail_after(20):
            while not os.path.exists(self.sock):
                await trio.sleep(0.02)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.fe = Frontend(self.sock, device_addr=A, device_size=NBLOCKS * B)
            await self.fe.realize()
            nursery.start_soon(self.fe.watch_backend_channel)
            await self.fe.start()
            self._ready.set()
            await trio.sleep_forever()

    def call(self, async_fn, *args):
        async def bounded():
            with trio.fail_after(30):  # a death is a pause, never a hang
                return await async_fn(*args)
        return trio.from_thread.run(bounded, trio_token=self._token)

    def control(self, command: str, **arguments):
        """A control command; waits out a restart (the socket is briefly absent)."""
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(self.ctl_path, timeout=10) as client:
                    return client.execute(command, **arguments)
            except (VmemdevError, OSError) as exc:
                if getattr(exc, "cls", None) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def worker(self) -> int:
        deadline = time.monotonic() + 20
        while (pid := only_child(self.proc.pid)) is None:
            assert time.monotonic() < deadline, "hold has no worker"
            time.sleep(0.02)
        return pid

    def close(self) -> None:
        if getattr(self, "_token", None) is not None:
            async def stop():
                await self.fe.close()
                self._nursery.cancel_scope.cancel()
            try:
                trio.from_thread.run(stop, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self.fe.release()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.dir.cleanup()


class DeathsDataSafety(DataSafety):
    """DataSafety's guest requests and expectations (inherited), with the
    daemon in its own processes: the operator's resize goes through the
    control socket, memory.max and the VMM's resets stay with DataSafety."""

    serve_args: tuple[str, ...] = ()

    def __init__(self):
        RuleBasedStateMachine.__init__(self)
        self.dev = HeldDevice(*self.serve_args)
        self.fe = self.dev.fe
        self.plugged: dict[int, int] = {}
        self.requested = 0
        self.max: int | None = None  # no memory.max here: DataSafety's plug reads it
        self.usable = 0
        self.generation = 0
        self.deaths = 0

    def teardown(self):
        self.dev.close()

    # DataSafety's rules that reach into the in-process daemon: not here.
    set_memory_max = device_reset = new_memory_table = None

    @rule(blocks=st.integers(0, NBLOCKS))
    def resize(self, blocks):
        self.dev.control("resize", size=blocks * B)
        self.requested = blocks * B
        if blocks:
            self.usable = NBLOCKS * B  # requested + 256M covers the whole 96M region

    # --- deaths ------------------------------------------------------------------

    @precondition(lambda self: self.deaths < MAX_DEATHS)
    @rule()
    def kill_between_requests(self):
        os.kill(self.dev.worker(), signal.SIGKILL)
        self.deaths += 1

    @precondition(lambda self: self.deaths < MAX_DEATHS)
    @rule(point=st.sampled_from(POINTS))
    def die_inside_a_later_request(self, point):
        """Armed: the next request that passes ``point`` dies there."""
        marker = os.path.join(self.dev.markers, point)
        if os.path.exists(marker):
            os.unlink(marker)
            self.deaths += 1

    def _check_plugged_size(self) -> None:  # DataSafety's invariant asks this, then checks the data
        status = self.dev.control("query-status")
        assert status["plugged_size"] == len(self.plugged) * B, (status["plugged_size"], sorted(self.plugged))


class DeathsDataSafetyPrealloc(DeathsDataSafety):
    serve_args = ("--prealloc",)


SETTINGS = settings(max_examples=8, stateful_step_count=25, deadline=None,
                    suppress_health_check=list(HealthCheck))
TestDeathsDataSafety = DeathsDataSafety.TestCase
TestDeathsDataSafety.settings = SETTINGS
TestDeathsDataSafetyPrealloc = DeathsDataSafetyPrealloc.TestCase
TestDeathsDataSafetyPrealloc.settings = SETTINGS

