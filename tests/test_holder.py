"""`vmemdev hold`: a worker's stored fds outlive it, and the worker is restarted
with them (the sd_notify fd-store protocol, as under systemd). Real processes,
real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vmemdev.daemon.holder import FdStore, handle_notify
from vmemdev.testing.frontend import Frontend
from vmemdev.testing.processes import only_child

VMEMDEV = [sys.executable, "-m", "vmemdev"]

# First run: store a memfd holding "generation-1", then hang until killed.
# Second run (it got the memfd back): report what it holds and exit cleanly.
WORKER = textwrap.dedent("""
    import os, sys, time
    from vmemdev.daemon import systemd
    out = sys.argv[1]
    kept = systemd.listen_fds()
    if "state" in kept:
        with open(out, "w") as f:
            f.write(os.pread(kept["state"], 64, 0).decode() + f" pid={os.getpid()}")
        sys.exit(0)
    fd = os.memfd_create("state")
    os.write(fd, b"generation-1")
    assert systemd.store_fds("state", [fd])
    with open(out + ".pid", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
""")


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.02)
    return result


def read_if_exists(path) -> str | None:
    try:
        return path.read_text() or None
    except FileNotFoundError:
        return None


def test_a_killed_worker_is_restarted_with_the_fds_it_stored(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(VMEMDEV + ["hold", "--", sys.executable, "-c", WORKER, str(out)],
                              stderr=subprocess.PIPE, text=True)
    try:
        first = int(wait_for(lambda: read_if_exists(tmp_path / "out.pid")))
        os.kill(first, signal.SIGKILL)
        assert holder.wait(timeout=20) == 0
        report = out.read_text()
        assert report.startswith("generation-1 pid=") and report != f"generation-1 pid={first}"
        log = holder.stderr.read()
        assert "died (signal SIGKILL); restarting it" in log and "with 1 stored fds" in log
    finally:
        holder.kill()
        holder.wait()


async def test_the_vhost_user_socket_survives_the_daemon(tmp_path):
    """kill -9 of `vmemdev serve` under the holder: the listening socket is the
    same one (never unbound, never re-bound), a front-end that connects during
    the restart is served by the new process, SIGTERM ends both cleanly."""
    sock = tmp_path / "vm0.sock"
    holder = subprocess.Popen(VMEMDEV + ["hold", "--", *VMEMDEV, "serve", "--socket-path", str(sock)],
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "vm0.ctl").exists())
        inode = sock.stat().st_ino
        first = wait_for(lambda: only_child(holder.pid))
        os.kill(first, signal.SIGKILL)
        fe = Frontend(str(sock))
        await fe.realize()  # queued in the kept socket's backlog until the new worker accepts
        await fe.start()
        assert (await fe.get_config()).region_size == 1 << 30
        second = only_child(holder.pid)
        assert second not in (None, first) and sock.stat().st_ino == inode
        await fe.close()
        fe.release()
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=20) == 0
        assert not sock.exists()
        log = holder.stderr.read()
        assert "inherited fd" in log and "died (signal SIGKILL)" in log
    finally:
        holder.kill()
        holder.wait()


def test_notify_messages_are_applied_or_ignored():
    store = FdStore(max_fds=2)
    fds = [os.memfd_create(f"m{i}") for i in range(4)]
    assert handle_notify(store, b"FDSTORE=1\nFDNAME=a", fds[:1]) is False
    assert store.entries == [("a", fds[0])]
    handle_notify(store, b"FDSTORE=1\nFDNAME=bad:name", fds[1:2])  # not a valid name: closed
    with pytest.raises(OSError):
        os.fstat(fds[1])
    handle_notify(store, b"FDSTORE=1\nFDNAME=b", fds[2:4])  # one fits, the other is closed
    assert [name for name, _ in store.entries] == ["a", "b"]
    with pytest.raises(OSError):
        os.fstat(fds[3])
    handle_notify(store, b"FDSTOREREMOVE=1\nFDNAME=a", [])
    with pytest.raises(OSError):
        os.fstat(fds[0])
    assert handle_notify(store, b"\xff\x00garbage\nREADY=1", []) is True
    assert [name for name, _ in store.entries] == ["b"]
    store.close()
