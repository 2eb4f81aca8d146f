"""The daemon and a QEMU-like front-end in a background Trio thread, driven
synchronously: what hypothesis state machines need (their rules are sync)."""

from __future__ import annotations

import functools
import os
import tempfile
import threading

import trio

from vmemdev.daemon.runtime import DeviceRuntime
from vmemdev.daemon.vhost_server import serve
from vmemdev.testing.frontend import Frontend
from vmemdev.virtio_mem.model import Geometry


class ThreadedDevice:
    def __init__(self, geometry: Geometry, requested: int = 0, **service_options):
        self.service = DeviceRuntime(geometry, requested, **service_options)
        self._dir = tempfile.TemporaryDirectory(prefix="vmemdev-sm-")
        self.path = os.path.join(self._dir.name, "vm.sock")
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(20) or self._error:
            raise RuntimeError(f"device did not start: {self._error!r}")

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(functools.partial(serve, self.service, socket_path=self.path,
                                                  handle_signals=False))
            g = self.service.geometry
            self.fe = Frontend(self.path, device_addr=g.addr, device_size=g.region_size)
            await self.fe.realize()
            nursery.start_soon(self.fe.watch_backend_channel)
            await self.fe.start()
            self._ready.set()

    def call(self, async_fn, *args):
        """Run a coroutine function of the front-end (or anything) on the Trio thread."""
        return trio.from_thread.run(async_fn, *args, trio_token=self._token)

    def call_sync(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def close(self) -> None:
        async def stop():
            await self.fe.close()
            self._nursery.cancel_scope.cancel()

        try:
            self.call(stop)
        except trio.RunFinishedError:
            pass
        self._thread.join(10)
        self.fe.release()
        self._dir.cleanup()
