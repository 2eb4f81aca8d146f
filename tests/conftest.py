"""Shared fixtures: a real daemon on a real Unix socket, and QEMU-like front-ends."""

from __future__ import annotations

import functools
import logging
import shutil

import pytest
import trio

from vmemdev.daemon.control_server import ControlServer
from vmemdev.daemon.runtime import DeviceRuntime
from vmemdev.daemon.vhost_server import serve
from vmemdev.testing.cgroup import ChildMemoryCgroup, unavailable
from vmemdev.testing.frontend import Frontend
from vmemdev.virtio_mem.model import Geometry

MiB = 1 << 20
GiB = 1 << 30
B = 2 * MiB  # block size of the conformance cases
A = 4 * GiB  # device address
R = 1 * GiB  # region size


@pytest.fixture
def memory_cgroup():
    """A throw-away cgroup v1 memory cgroup (no limit set). Fails, never skips,
    where it cannot be made: these tests are what shows the cgroup rules hold."""
    problem = unavailable()
    if problem:
        pytest.fail(f"needs a writable cgroup v1 memory controller ({problem}; root on this "
                    "project's machines and in CI)")
    cg = ChildMemoryCgroup()
    yield cg
    cg.remove()


@pytest.fixture
def strace() -> str:
    """strace's path. Fails, never skips: a kill -9 inside a discard or a
    populate is shown by holding the daemon there with strace."""
    path = shutil.which("strace")
    if path is None:
        pytest.fail("needs strace to hold the daemon inside a syscall: apt-get install strace", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def _debug_logs(caplog):
    caplog.set_level(logging.INFO, logger="vmemdev")


async def start_daemon(nursery, tmp_path, *, addr=A, size=R, block=B, requested=0, name="vm0",
                       control=False, control_group=None, **service_options):
    service = DeviceRuntime(Geometry(addr, size, block), requested, **service_options)
    path = str(tmp_path / f"{name}.sock")
    server = ControlServer(service, str(tmp_path / f"{name}.ctl"), control_group) if control else None
    await nursery.start(functools.partial(serve, service, socket_path=path, control=server))
    return service, path


async def attach(nursery, service, path, watch_backend_channel=True, **kwargs) -> Frontend:
    g = service.geometry
    kwargs.setdefault("device_addr", g.addr)
    kwargs.setdefault("device_size", g.region_size)
    fe = Frontend(path, **kwargs)
    await fe.realize()
    if watch_backend_channel:
        nursery.start_soon(fe.watch_backend_channel)
    await fe.start()
    return fe


@pytest.fixture
async def daemon(nursery, tmp_path):
    return await start_daemon(nursery, tmp_path)


@pytest.fixture
async def attached(daemon, nursery):
    service, path = daemon
    fe = await attach(nursery, service, path)
    yield service, fe
    await fe.close()
    fe.release()


async def settle(seconds: float = 0.05) -> None:
    """Let the daemon's tasks run (notifications travel over a real socket)."""
    await trio.sleep(seconds)
