"""systemd integration: the units, sd_notify, socket activation, journal-aware logs."""

from __future__ import annotations

import array
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from vmemdev.testing.frontend import Frontend

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
VMEMDEV = [sys.executable, "-m", "vmemdev"]
SECURITY_THRESHOLD = 2.0  # systemd-analyze security exposure, 0 (best) .. 10

needs_systemd_tools = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                         reason="systemd-analyze is not installed")


def units_for_this_machine(tmp_path: Path) -> list[Path]:
    """The units as shipped, with ExecStart pointing at this checkout's vmemdev.

    /usr/local/bin/vmemdev is where `pip install .` puts it for the system Python;
    verify checks that the binary exists, so point it at the one we test.
    """
    binary = shutil.which("vmemdev") or str(Path(sys.executable).with_name("vmemdev"))
    out = []
    for unit in ("vmemdev@.service", "vmemdev@.socket"):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/vmemdev", binary)
        (tmp_path / unit).write_text(text)
        out.append(tmp_path / unit)
    return out


@needs_systemd_tools
def test_units_verify_without_any_output(tmp_path):
    units = units_for_this_machine(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                            capture_output=True, text=True, cwd=tmp_path)
    # verify exits 0 even on unknown keys: any output is a failure.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


@needs_systemd_tools
def test_service_hardening_exposure(tmp_path):
    service = units_for_this_machine(tmp_path)[0]
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(service)],
                            capture_output=True, text=True, cwd=tmp_path)
    line = next(l for l in result.stdout.splitlines() if "Overall exposure level" in l)
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= SECURITY_THRESHOLD, line


def _notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    return sock


def _wait_for(path: Path, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "daemon exited"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_type_notify_ready_status_stopping(tmp_path):
    notify = _notify_socket(tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    proc = subprocess.Popen(VMEMDEV + ["serve", "--socket-path", str(tmp_path / "vm0.sock"),
                                       "--requested-size", "64M"], env=env, stderr=subprocess.PIPE)
    try:
        messages, stored = [], []
        for _ in range(3):
            data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            messages.append(data.decode())
            stored += [array.array("i", payload) for level, kind, payload in ancillary
                       if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)]
        assert "READY=1" in messages
        status = next(m for m in messages if m.startswith("STATUS="))
        assert status == "STATUS=plugged 0, requested 64M, front-end waiting"
        # The listening socket goes to the fd store, for a restarted process to keep it.
        assert "FDSTORE=1\nFDNAME=vhost-user" in messages and len(stored) == 1 and len(stored[0]) == 1
        kept = socket.socket(fileno=stored[0][0])
        assert kept.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert kept.getsockname().startswith(str(tmp_path / "vm0.sock"))  # bound as .new, then renamed
        kept.close()
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        notify.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
async def test_socket_activation_with_systemd_socket_activate(tmp_path):
    sock_path = tmp_path / "vm0.sock"
    ctl_path = tmp_path / "vm0.ctl"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock_path), "--fdname=vhost-user",
         *VMEMDEV, "--instance", "vm0", "serve", "--control-socket", str(ctl_path),
         "--requested-size", "32M"],
        stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock_path, proc)
        fe = Frontend(str(sock_path))  # the first connection starts the daemon
        with trio.fail_after(20):
            await fe.realize()
            assert (await fe.get_config()).requested_size == 32 << 20
        await fe.close()
        fe.release()
        _wait_for(ctl_path, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    err = proc.stderr.read()
    assert "serving virtio-mem on fd 3" in err and "vmemdev[vm0]" in err


def test_journal_aware_and_json_logs(tmp_path):
    log_file = tmp_path / "stderr"
    with open(log_file, "w") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen(VMEMDEV + ["serve", "--socket-path", str(tmp_path / "vm7.sock")],
                                env=env, stderr=err)
        _wait_for(tmp_path / "vm7.ctl", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    lines = log_file.read_text().splitlines()
    assert lines and all(l.startswith("<6>vmemdev[vm7] INFO ") or l.startswith("<4>") for l in lines), lines

    proc = subprocess.run(VMEMDEV + ["--log-format", "json", "--instance", "web1", "serve",
                                     "--socket-path", str(tmp_path / "vm8.sock"), "--block-size", "3M"],
                          capture_output=True, text=True)
    assert proc.returncode == 2  # usage errors stay one plain line
    proc = subprocess.Popen(VMEMDEV + ["--log-format", "json", "--instance", "web1", "serve",
                                       "--socket-path", str(tmp_path / "vm8.sock")],
                            stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "vm8.ctl", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    records = [json.loads(l) for l in proc.stderr.read().splitlines()]
    assert records and all(r["instance"] == "web1" for r in records)
    assert any(r["msg"] == "received SIGTERM, exiting" for r in records)


def test_fds_of_one_file_are_stored_once_and_handed_back_under_each_name(monkeypatch):
    """systemd's fd store keeps one fd per open file (same_fd(): kcmp): QEMU's
    RAM memfd, sent once per memory region, would lose every region but the
    first. So such fds go once as "mem0+mem1", and a successor gets each name back."""
    from vmemdev.daemon import systemd as sd
    from vmemdev.daemon.holder import FdStore

    ram = os.memfd_create("ram")
    second_region = os.dup(ram)  # what a second SCM_RIGHTS copy of one fd is: the same open file
    other_ram = os.memfd_create("ram")  # the same name, another file
    kick, call = os.eventfd(0), os.eventfd(0)  # eventfds share one inode, not one file
    fds = {"mem0": ram, "mem1": second_region, "mem2": other_ram, "call0": call}
    groups = sd.group_same_files(fds)
    assert [names for names, _ in groups] == [["mem0", "mem1"], ["mem2"], ["call0"]]
    assert sd.same_file(ram, second_region) and not sd.same_file(ram, other_ram) and not sd.same_file(kick, call)
    # `vmemdev hold` keeps one fd per file, as systemd does.
    store = FdStore()
    store.store("mem0", [os.dup(ram)])
    store.store("mem1", [os.dup(second_region)])
    store.store("kick0", [os.dup(kick)])
    store.store("call0", [os.dup(call)])
    assert [name for name, _ in store.entries] == ["mem0", "kick0", "call0"]
    store.close()
    # A successor: "mem0+mem1" gives both names, each its own fd of the one file.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "mem0+mem1")
    saved = os.dup(3) if _fd_open(3) else None
    try:
        os.dup2(ram, 3, inheritable=True)
        got = sd.listen_fds()
        assert set(got) == {"mem0", "mem1"} and got["mem0"] == 3 and got["mem1"] != 3
        assert sd.same_file(got["mem0"], got["mem1"]) and not os.get_inheritable(got["mem1"])
        os.close(got["mem1"])
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        for fd in (ram, second_region, other_ram, kick, call):
            os.close(fd)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_the_store_is_touched_only_where_an_fd_changed(tmp_path, monkeypatch):
    """Most vhost-user messages change no fd: then nothing is removed from the
    store (a death just then would find it half rewritten). A replaced call
    eventfd is removed and stored again; a closed and reused fd number is seen."""
    import socket as socketmod

    from vmemdev.daemon.keeper import ConnectionKeeper

    listener = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))

    def sent() -> list[str]:
        out = []
        while True:
            try:
                data, ancdata, _, _ = listener.recvmsg(4096, socketmod.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return out
            for level, kind, payload in ancdata:  # close what the keeper sent us
                if level == socketmod.SOL_SOCKET and kind == socketmod.SCM_RIGHTS:
                    for i in range(0, len(payload), 4):
                        os.close(int.from_bytes(payload[i:i + 4], "little"))
            out.append(data.decode().replace("\n", " "))

    ram, kick, call = os.memfd_create("ram"), os.eventfd(0), os.eventfd(0)
    keeper = ConnectionKeeper(str(tmp_path / "vm0.state"))
    keeper.keep_fds({"mem0": ram, "mem1": ram, "kick0": kick, "call0": call})
    assert sent() == ["FDSTORE=1 FDNAME=mem0+mem1", "FDSTORE=1 FDNAME=kick0", "FDSTORE=1 FDNAME=call0"]
    keeper.keep_fds({"mem0": ram, "mem1": ram, "kick0": kick, "call0": call})
    assert sent() == []  # e.g. SET_VRING_ENABLE: nothing to do
    new_call = os.eventfd(0)
    keeper.keep_fds({"mem0": ram, "mem1": ram, "kick0": kick, "call0": new_call})
    assert sent() == ["FDSTOREREMOVE=1 FDNAME=call0", "FDSTORE=1 FDNAME=call0"]
    os.close(kick)
    reused = os.eventfd(0)  # likely the same number as the closed kick: another file
    keeper.keep_fds({"mem0": ram, "mem1": ram, "kick0": reused, "call0": new_call})
    assert sent() == ["FDSTOREREMOVE=1 FDNAME=kick0", "FDSTORE=1 FDNAME=kick0"]
    keeper.forget()
    assert sorted(sent()) == ["FDSTOREREMOVE=1 FDNAME=call0", "FDSTOREREMOVE=1 FDNAME=kick0",
                              "FDSTOREREMOVE=1 FDNAME=mem0+mem1"]
    for fd in (ram, call, new_call, reused):
        os.close(fd)
    listener.close()
