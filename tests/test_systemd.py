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


def test_fds_of_one_file_are_stored_once_and_each_role_gets_its_own(monkeypatch):
    """systemd's fd store keeps one fd per open file (same_fd(): kcmp): QEMU's
    RAM memfd, sent once per memory region, would lose every region but the
    first. So roles that share a file share one entry, and a successor gives
    each role its own fd of it again."""
    from vmemdev.daemon import systemd as sd
    from vmemdev.daemon.holder import FdStore
    from vmemdev.daemon.storedfds import StoredFds

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    ram = os.memfd_create("ram")
    second_region = os.dup(ram)  # what a second SCM_RIGHTS copy of one fd is: the same open file
    other_ram = os.memfd_create("ram")  # the same name, another file
    kick, call = os.eventfd(0), os.eventfd(0)  # eventfds share one inode, not one file
    assert sd.same_file(ram, second_region) and not sd.same_file(ram, other_ram) and not sd.same_file(kick, call)
    stored = StoredFds()
    stored.stage({"mem0": ram, "mem1": second_region, "mem2": other_ram, "call0": call})
    assert stored.roles == {"mem0": "mem0@1", "mem1": "mem0@1", "mem2": "mem2@2", "call0": "call0@3"}
    # `vmemdev hold` keeps one fd per file, as systemd does, whatever the name.
    store = FdStore()
    store.store("mem0@1", [os.dup(ram)])
    store.store("mem1@9", [os.dup(second_region)])
    store.store("call0@3", [os.dup(call)])
    assert [name for name, _ in store.entries] == ["mem0@1", "call0@3"]
    store.close()
    # A successor: each role its own fd of the one file.
    successor = StoredFds()
    given = {"mem0@1": os.dup(ram), "mem2@2": os.dup(other_ram), "call0@3": os.dup(call)}
    successor.adopt(given, stored.roles)
    fds = successor.resolve(given)
    assert fds["mem0"] == given["mem0@1"] and fds["mem1"] not in given.values()
    assert sd.same_file(fds["mem0"], fds["mem1"]) and fds["mem2"] == given["mem2@2"]
    for fd in (*fds.values(), ram, second_region, other_ram, kick, call):
        os.close(fd)
    stored.forget()
    successor.forget()


def test_listen_fds_gives_names_as_stored(monkeypatch):
    from vmemdev.daemon import systemd as sd

    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "mem0@7")
    saved = os.dup(3) if _fd_open(3) else None
    ram = os.memfd_create("ram")
    try:
        os.dup2(ram, 3, inheritable=True)
        assert sd.listen_fds() == {"mem0@7": 3} and not os.get_inheritable(3)
        assert "LISTEN_FDS" not in os.environ
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        os.close(ram)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class NotifyListener:
    """A stand-in for the service manager's notify socket: what was sent, in order."""

    def __init__(self, tmp_path, monkeypatch):
        import socket as socketmod

        self.sock = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
        self.sock.bind(str(tmp_path / "notify"))
        self.sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))

    def sent(self) -> list[str]:
        import socket as socketmod

        out = []
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socketmod.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return out
            for level, kind, payload in ancdata:  # close what the keeper sent us
                if level == socketmod.SOL_SOCKET and kind == socketmod.SCM_RIGHTS:
                    for i in range(0, len(payload), 4):
                        os.close(int.from_bytes(payload[i:i + 4], "little"))
            out.append(data.decode().replace("\n", " "))


def test_the_store_is_touched_only_where_an_fd_changed(tmp_path, monkeypatch):
    """Most vhost-user messages change no fd: then the store is not touched. A
    replaced call eventfd goes in under a new name before the old entry is
    removed; a closed and reused fd number is seen as another file."""
    from vmemdev.daemon.storedfds import StoredFds

    notify = NotifyListener(tmp_path, monkeypatch)
    ram, kick, call = os.memfd_create("ram"), os.eventfd(0), os.eventfd(0)
    stored = StoredFds()
    stored.stage({"mem0": ram, "mem1": ram, "kick0": kick, "call0": call})
    stored.commit()
    assert notify.sent() == ["FDSTORE=1 FDNAME=mem0@1", "FDSTORE=1 FDNAME=kick0@2", "FDSTORE=1 FDNAME=call0@3"]
    stored.stage({"mem0": ram, "mem1": ram, "kick0": kick, "call0": call})
    stored.commit()
    assert notify.sent() == []  # e.g. SET_VRING_ENABLE: nothing to do
    new_call = os.eventfd(0)
    stored.stage({"mem0": ram, "mem1": ram, "kick0": kick, "call0": new_call})
    assert notify.sent() == ["FDSTORE=1 FDNAME=call0@4"]  # the old one stays until the state names the new
    stored.commit()
    assert notify.sent() == ["FDSTOREREMOVE=1 FDNAME=call0@3"]
    os.close(kick)
    reused = os.eventfd(0)  # likely the same number as the closed kick: another file
    stored.stage({"mem0": ram, "mem1": ram, "kick0": reused, "call0": new_call})
    stored.commit()
    assert notify.sent() == ["FDSTORE=1 FDNAME=kick0@5", "FDSTOREREMOVE=1 FDNAME=kick0@2"]
    stored.forget()
    assert sorted(notify.sent()) == ["FDSTOREREMOVE=1 FDNAME=call0@4", "FDSTOREREMOVE=1 FDNAME=kick0@5",
                                     "FDSTOREREMOVE=1 FDNAME=mem0@1"]
    for fd in (ram, call, new_call, reused):
        os.close(fd)


def test_at_every_instant_the_state_file_names_only_entries_the_store_holds(tmp_path, monkeypatch):
    """A death between any two steps of a save that changes fds (a memory
    table change, a new call eventfd) leaves a state file whose every entry
    is in the store: the store is simulated from the notifications, and PATH
    is read at each one. The connection is stored only once a state names it."""
    from vmemdev.daemon import keeper, storedfds
    from vmemdev.vhost.snapshot import EngineRecord
    from vmemdev.virtio_mem.model import Geometry, VirtioMemModel

    path = str(tmp_path / "vm0.state")
    store: set[str] = set()
    checked = []
    real_notify = storedfds.systemd.notify

    def notify(state: str, fds=()) -> bool:
        fields = dict(line.split("=", 1) for line in state.splitlines())
        named = set(json.load(open(path))["fds"].values()) if os.path.exists(path) else set()
        if fields.get("FDNAME") == "conn" and fields.get("FDSTORE") == "1":
            assert "conn" in named, "the connection is stored before a state names it"
        # A state naming a connection the store lacks is one a successor starts afresh from
        # (the connection died with the process); every other entry it names must be there.
        assert named - {"conn"} <= store, f"{path} names {named - store}, not in the store"
        if fields.get("FDSTORE") == "1":
            store.add(fields["FDNAME"])
        else:
            store.discard(fields["FDNAME"])
        checked.append(state)
        return real_notify(state, fds)

    monkeypatch.setattr(storedfds.systemd, "notify", notify)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    m = VirtioMemModel(Geometry(1 << 32, 1 << 30, 2 << 20), 0)
    engine = EngineRecord(1, 2, True, 15, (), ())
    conn, ram, ram2, call, call2 = (os.memfd_create("conn"), os.memfd_create("ram"), os.memfd_create("ram2"),
                                    os.eventfd(0), os.eventfd(0))
    k = keeper.ConnectionKeeper(path)
    k.save(engine, m.to_record(), fds={"conn": conn})
    k.save(engine, m.to_record(), fds={"conn": conn, "mem0": ram, "mem1": ram, "call0": call})
    k.save(engine, m.to_record(), fds={"conn": conn, "mem0": ram2, "call0": call2})  # a new table, a new call
    assert store == {"conn", "mem0@3", "call0@4"} == set(json.load(open(path))["fds"].values())
    assert len(checked) == 7
    k.forget()
    assert store == set() and not os.path.exists(path)
    for fd in (conn, ram, ram2, call, call2):
        os.close(fd)
