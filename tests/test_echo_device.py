"""The seam for other device types: the daemon's connection and the vhost
engine serve the test-only echo device, in its own process, to a QEMU-like
front-end over a real socket with memfds and eventfds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.vhost_user import Request
from vmemdev.testing.frontend import Frontend

from .echo_device import CONFIG, ECHO_FEATURE_LOUD, MAGIC

ROOT = Path(__file__).resolve().parent.parent


async def test_an_echo_device_served_by_the_daemon_connection(nursery, tmp_path):
    path = str(tmp_path / "echo.sock")
    proc = subprocess.Popen([sys.executable, "-m", "tests.echo_device", path], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert await trio.to_thread.run_sync(proc.stdout.readline) == "ready\n"
        fe = Frontend(path, dimm=False)
        await fe.realize()
        assert fe.backend_features & ECHO_FEATURE_LOUD and fe.queue_num == 1
        nursery.start_soon(fe.watch_backend_channel)
        await fe.start()
        for text in (b"hello vhost", b"x", b"0123456789abcdefghijklmn"):
            data, used = await fe.submit(text, 32)
            assert (data[:used], used) == (text[::-1], len(text))
        reply = await fe.ask(Request.GET_CONFIG, vu.encode_config(0, bytes(CONFIG.size)))
        assert CONFIG.unpack(reply[12:]) == (3, MAGIC)
        await fe.close()
        fe.release()
        assert await trio.to_thread.run_sync(proc.wait, 10) == 0  # the connection ended cleanly
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
