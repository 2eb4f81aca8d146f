"""``vmemdev demo``: the daemon serving a device to a built-in guest.

The real daemon code (``server.serve``) listens on a real Unix socket in a
temporary directory, with its control socket; the built-in front-end
connects the way QEMU 11.1 does, shares memfd-backed guest RAM and a DIMM,
and a simulated Linux virtio_mem driver plugs and unplugs through the
virtqueue. Each resize goes through the control socket, and the table shows
the device's view and the host's account of it.
"""

from __future__ import annotations

import functools
import os
import tempfile

import trio

from ..client import AsyncClient
from ..daemon.control_server import ControlServer
from ..daemon.runtime import DeviceRuntime
from ..daemon.vhost_server import serve
from ..sizes import format_size
from ..testing.frontend import Frontend
from ..testing.guest import SimulatedLinuxGuest

STEP_TIMEOUT = 60


def _row(cells) -> str:
    return "  ".join(f"{c:>10}" for c in cells)


async def run_demo(service: DeviceRuntime, steps: list[int]) -> int:
    g = service.geometry
    with tempfile.TemporaryDirectory(prefix="vmemdev-demo-") as tmp:
        path = os.path.join(tmp, "vm0.sock")
        control = ControlServer(service, os.path.join(tmp, "vm0.ctl"))
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, service, socket_path=path, control=control))
            fe = Frontend(path, device_addr=g.addr, device_size=g.region_size)
            try:
                await fe.realize()
                nursery.start_soon(fe.watch_backend_channel)
                await fe.start()
                guest = SimulatedLinuxGuest(fe)
                await nursery.start(guest.run)
                ctl = await AsyncClient.connect(control.path)
                print(f"\nvmemdev demo: device region {g.addr:#x}+{format_size(g.region_size)}, "
                      f"block {format_size(g.block_size)}, socket {path}")
                print("a simulated QEMU 11.1 front-end and Linux guest driver plug through the virtqueue;")
                print("each step is a resize on the control socket (as 'vmemdev ctl resize SIZE' does);")
                print("'host alloc' is what the region's backing memfd really holds, 'memmap' the")
                print("guest's struct-page cost for the Linux memory blocks in use\n")
                print(_row(["requested", "plugged", "usable", "host alloc", "outside", "memmap", "time"]))
                for step in steps:
                    started = trio.current_time()
                    await ctl.execute("resize", size=step)
                    with trio.move_on_after(STEP_TIMEOUT) as timeout:
                        while (await ctl.execute("query-status"))["plugged_size"] != step:
                            await trio.sleep(0.01)
                    status = await ctl.execute("query-status")
                    acct = await ctl.execute("query-accounting")
                    print(_row([
                        format_size(status["requested_size"]),
                        format_size(status["plugged_size"]),
                        format_size(status["usable_region_size"]),
                        format_size(acct["host_allocated"]),
                        format_size(acct["allocated_outside_plugged"]),
                        format_size(acct["memmap"]["memmap_bytes"]),
                        f"{(trio.current_time() - started) * 1000:.0f} ms",
                    ]))
                    if timeout.cancelled_caught:
                        print(f"the guest did not reach {format_size(step)} within {STEP_TIMEOUT} s")
                        return 1
                guest.check_contents()
                stats = await ctl.execute("query-stats")
                print(f"\nrequests: {stats['requests']}")
                print(f"{format_size(stats['bytes_discarded'])} given back to the host by hole punching")
                print("plugged memory kept its contents; unplugged memory went back to the host.")
                print("run the tests with: ./dev test")
                await ctl.aclose()
            finally:
                nursery.cancel_scope.cancel()
                await fe.close()
        fe.release()
    return 0
