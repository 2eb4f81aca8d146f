"""`vmemdev ctl upgrade`: the serving process re-executes the installed vmemdev
with the attached connection's fds inherited. The front-end (kept as QEMU
keeps it) never sees its connection close; the pid stays; the device keeps
its state. Real processes, sockets, memfds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import trio

from vmemdev.protocol.virtio_mem import BlockState, ResponseType
from vmemdev.testing.processes import only_child

from .test_holder import wait_for
from .test_resume import A, Held, MiB, attach

VMEMDEV = [sys.executable, "-m", "vmemdev"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ctl(held: Held, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(VMEMDEV + ["ctl", "--control-socket", str(held.dir / "vm0.ctl"), *args],
                          capture_output=True, text=True, timeout=90)


async def test_an_upgrade_in_place_is_a_pause_for_the_front_end(tmp_path, nursery):
    held = Held(tmp_path)
    try:
        fe = await attach(held, nursery)
        assert await fe.plug(A, 4) == ResponseType.ACK
        worker = wait_for(lambda: only_child(held.proc.pid))
        started = held.ctl("status")["started"]
        result = await trio.to_thread.run_sync(lambda: ctl(held, "--json", "upgrade"))
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["pid"] == worker and report["status"]["pid"] == worker  # execve, not a restart
        assert report["status"]["started"] > started
        assert report["status"]["resumed"] == {"count": 1, "last": report["status"]["resumed"]["last"],
                                               "by": "upgrade"}
        assert only_child(held.proc.pid) == worker  # the holder saw nothing die
        with trio.fail_after(20):
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
            assert await fe.plug(A + 8 * MiB, 4) == ResponseType.ACK
            assert await fe.unplug(A, 4) == ResponseType.ACK
        assert held.ctl("status")["plugged_size"] == 8 * MiB
        assert fe.dimm_allocated() <= 8 * MiB
        # A resize after the upgrade reaches the driver through the inherited backend channel.
        seen = fe.config_changes
        held.ctl("resize", "128M")
        with trio.fail_after(10):
            while fe.config_changes == seen:
                await trio.sleep(0.01)
        log = held.log()
        assert "re-executing" in log and "upgraded in place" in log
        # A second upgrade works as the first did (the new process can hand over again).
        result = await trio.to_thread.run_sync(lambda: ctl(held, "upgrade"))
        assert result.returncode == 0 and "upgraded in place" in result.stdout, result.stdout + result.stderr
        with trio.fail_after(20):
            assert await fe.state(A + 8 * MiB, 4) == (ResponseType.ACK, BlockState.PLUGGED)
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.kill()


async def test_an_upgrade_without_a_state_file_is_refused_while_a_front_end_is_attached(tmp_path, nursery):
    sock = str(tmp_path / "vm0.sock")
    proc = subprocess.Popen(VMEMDEV + ["serve", "--socket-path", sock, "--requested-size", "64M"],
                            stderr=open(tmp_path / "serve.log", "w"))
    try:
        wait_for(lambda: (tmp_path / "vm0.ctl").exists())
        from vmemdev.testing.frontend import Frontend

        fe = Frontend(sock)
        await fe.realize()
        await fe.start()
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run(VMEMDEV + ["ctl", "--control-socket", str(tmp_path / "vm0.ctl"), "upgrade"],
                                   capture_output=True, text=True, timeout=60))
        assert result.returncode == 1 and "--state-file" in result.stderr, result.stdout + result.stderr
        with trio.fail_after(10):
            assert await fe.plug(A, 1) == ResponseType.ACK  # nothing was disturbed
        await fe.close()
        fe.release()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


async def test_an_upgrade_to_a_version_that_does_not_start_is_refused(tmp_path, nursery):
    """The installed version is run before anything changes. Here the upgrade
    is half-installed: a package that fails to import now shadows vmemdev on
    the daemon's import path (PYTHONPATH, empty when the daemon started)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    held = Held(tmp_path, env={"PYTHONPATH": f"{shadow}:{REPO}"}, cwd=str(shadow))
    try:
        fe = await attach(held, nursery)
        assert await fe.plug(A, 2) == ResponseType.ACK
        worker = wait_for(lambda: only_child(held.proc.pid))
        (shadow / "vmemdev").mkdir()
        (shadow / "vmemdev" / "__init__.py").write_text("raise ImportError('half-installed')\n")
        result = await trio.to_thread.run_sync(lambda: ctl(held, "upgrade"))
        assert result.returncode == 1, result.stdout + result.stderr
        assert "not upgraded: the installed vmemdev does not start" in result.stderr
        assert "half-installed" in result.stderr, result.stderr
        status = held.ctl("status")
        assert status["pid"] == worker and status["resumed"]["count"] == 0
        with trio.fail_after(10):  # the connection was never parked
            assert await fe.plug(A + 4 * MiB, 2) == ResponseType.ACK
        await fe.close()
        fe.release()
    finally:
        held.kill()
