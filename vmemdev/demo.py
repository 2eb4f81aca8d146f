"""``vmemdev demo``: the daemon serving a device to a built-in guest.

The real daemon code (``server.serve``) listens on a real Unix socket in a
temporary directory; the built-in front-end connects to it the way QEMU
11.1 does, shares memfd-backed guest RAM and a 1 GiB DIMM, and a simulated
Linux virtio_mem driver plugs and unplugs through the virtqueue. After each
resize the table shows the device's view and the host's: what the backing
file really has allocated.
"""

from __future__ import annotations

import os
import tempfile

import trio

from . import native
from .server import serve
from .service import DeviceService
from .sizes import format_size
from .testing.frontend import Frontend
from .testing.guest import SimulatedLinuxGuest

STEP_TIMEOUT = 60


def _row(cells) -> str:
    return "  ".join(f"{c:>10}" for c in cells)


async def run_demo(service: DeviceService, steps: list[int]) -> int:
    g = service.geometry
    with tempfile.TemporaryDirectory(prefix="vmemdev-demo-") as tmp:
        path = os.path.join(tmp, "vm0.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(service, socket_path=path, task_status=task_status))
            fe = Frontend(path, device_addr=g.addr, device_size=g.region_size)
            try:
                await fe.realize()
                nursery.start_soon(fe.watch_backend_channel)
                await fe.start()
                guest = SimulatedLinuxGuest(fe)
                await nursery.start(guest.run)
                print(f"\nvmemdev demo: device region {g.addr:#x}+{format_size(g.region_size)}, "
                      f"block {format_size(g.block_size)}, socket {path}")
                print("a simulated QEMU 11.1 front-end and Linux guest driver plug through the virtqueue;")
                print("'host alloc' is what the region's backing memfd really holds (st_blocks)\n")
                print(_row(["requested", "plugged", "usable", "host alloc", "notified", "time"]))
                for step in steps:
                    started = trio.current_time()
                    service.resize(step)
                    with trio.move_on_after(STEP_TIMEOUT) as timeout:
                        while service.device.plugged_size != step:
                            await trio.sleep(0.01)
                    d = service.device
                    print(_row([
                        format_size(d.requested_size),
                        format_size(d.plugged_size),
                        format_size(d.usable_region_size),
                        format_size(native.allocated_bytes(fe.ram.dimm_fd)),
                        f"{fe.config_changes}x",
                        f"{(trio.current_time() - started) * 1000:.0f} ms",
                    ]))
                    if timeout.cancelled_caught:
                        print(f"the guest did not reach {format_size(step)} within {STEP_TIMEOUT} s")
                        return 1
                guest.check_contents()
                print("\nplugged memory kept its contents; unplugged memory went back to the host.")
                print("run the tests with: ./dev test")
            finally:
                nursery.cancel_scope.cancel()
                await fe.close()
        fe.release()
    return 0

