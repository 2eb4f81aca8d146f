"""The shipped units under a real systemd 252 (PID 1 of a container): socket
activation, the fd store across a kill -9 (Restart=on-failure), `systemctl
reload` (an upgrade in place), and a corrupted state file
(RestartPreventExitStatus=2). The front-end runs on the host and keeps its
connection and ring as QEMU does; memfds and eventfds cross into the
container (same kernel) through the socket in the bound /run/vmemdev."""

from __future__ import annotations

import os
import time

import pytest
import trio

from vmemdev.protocol import vhost_user as vu
from vmemdev.protocol.vhost_user import Request
from vmemdev.protocol.virtio_mem import BlockState, ResponseType
from vmemdev.testing.frontend import Frontend

from .conftest import TIMINGS
from .lab import REPO, wait_until

pytestmark = pytest.mark.systemd

MiB = 1 << 20
A = 1 << 32  # the device region's default address
VM = "vm0"
SERVICE, SOCKET = f"vmemdev@{VM}.service", f"vmemdev@{VM}.socket"
# Every fd of an attached connection the daemon keeps in the fd store: the
# test front-end's memory table has three regions, two of them in one memfd
# (as QEMU's RAM below and above a hole), and one ring.
CONNECTION_FDS = {"conn", "backend", "kick0", "call0", "err0", "mem0", "mem1", "mem2"}
# systemd keeps one fd per open file: mem0 and mem1 share one entry.
STORED = len(CONNECTION_FDS) - 1


@pytest.fixture
def vm0(container):
    container.reset(VM)
    (container.etc_dir / f"{VM}.conf").write_text("VMEMDEV_OPTS=--requested-size 64M\n")
    container.systemctl("start", SOCKET)
    try:
        yield container
    finally:
        container.reset(VM)


async def attach(box, nursery) -> Frontend:
    fe = Frontend(str(box.run_dir / f"{VM}.sock"))
    with trio.fail_after(30):
        await fe.realize()  # the first connection starts the service
        nursery.start_soon(fe.watch_backend_channel)
        await fe.start()
    return fe


async def done(fe: Frontend) -> None:
    await fe.close()
    fe.release()


def sync(fn, *args):
    return trio.to_thread.run_sync(lambda: fn(*args))


def no_unit_trouble(box) -> None:
    """Nothing in the service's journal says a setting or a notification was refused."""
    journal = box.journal(SERVICE)
    bad = [line for line in journal.splitlines()
           if any(s in line for s in ("Failed to", "failed to", "Got notification message from PID",
                                      "Ignoring", "not allowed", "Traceback", "ERROR"))]
    assert not bad, journal


def hardening_in_force(box, pid: int) -> None:
    """The unit's sandbox, as the kernel shows it for the serving process."""
    status = dict(line.split(":", 1) for line in box.sh("cat", f"/proc/{pid}/status").stdout.splitlines())
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0, status  # CapabilityBoundingSet=
    for ns in ("mnt", "net", "ipc", "uts"):  # PrivateTmp/ProtectSystem, PrivateNetwork, PrivateIPC, ProtectHostname
        ours, pid1 = (box.sh("readlink", f"/proc/{p}/ns/{ns}").stdout for p in (pid, 1))
        assert ours != pid1, f"{ns} namespace not private"
    mounts = box.sh("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()
    root = next(line.split() for line in mounts if line.split()[4] == "/")
    assert "ro" in root[5].split(","), root  # ProtectSystem=strict
    run = [line.split() for line in mounts if line.split()[4] == "/run/vmemdev"][-1]
    assert "rw" in run[5].split(","), run  # RuntimeDirectory= stays writable


async def test_socket_activation_and_a_front_end_from_the_host(vm0, nursery):
    box = vm0
    for unit in ("vmemdev@.service", "vmemdev@.socket"):  # the shipped units, unchanged
        assert box.sh("cat", f"/etc/systemd/system/{unit}").stdout == (REPO / "systemd" / unit).read_text()
    assert box.show(SOCKET, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "listening"}
    assert box.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    fe = await attach(box, nursery)
    shown = box.show(SERVICE, "ActiveState", "SubState", "MainPID", "NFileDescriptorStore", "StatusText")
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running"), shown
    with trio.fail_after(20):
        assert await fe.plug(A, 4) == ResponseType.ACK
        assert await fe.plug(A + 8 * MiB, 2) == ResponseType.ACK
        assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
    hardening_in_force(box, int(shown["MainPID"]))
    status = await sync(box.ctl, VM, "status")
    assert status["pid"] == int(shown["MainPID"]) and status["plugged_size"] == 12 * MiB
    assert status["frontend"] == "attached" and status["resumed"]["count"] == 0
    # Every fd of the connection is in systemd's store (the listening socket
    # stays the socket unit's).
    stored = int(box.show(SERVICE, "NFileDescriptorStore")["NFileDescriptorStore"])
    assert stored == STORED, f"systemd's fd store holds {stored} fds, the connection has {STORED} files " \
                             f"({sorted(CONNECTION_FDS)}, mem0 and mem1 in one memfd)"
    status_text = box.show(SERVICE, "StatusText")["StatusText"]
    wait_until(lambda: "front-end attached" in box.show(SERVICE, "StatusText")["StatusText"], 10,
               f"STATUS= to say the front-end is attached (is {status_text!r})")
    no_unit_trouble(box)
    await done(fe)


async def test_kill_9_restarts_with_the_fd_store_and_the_connection_lives_on(vm0, nursery):
    box = vm0
    fe = await attach(box, nursery)
    with trio.fail_after(20):
        assert await fe.plug(A, 4) == ResponseType.ACK
    pids = [int(box.show(SERVICE, "MainPID")["MainPID"])]
    for kill in range(1, 4):
        started = time.monotonic()
        await sync(box.systemctl, "kill", "--signal=KILL", SERVICE)
        with trio.fail_after(30):  # the same connection, never closed
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
        TIMINGS.setdefault("kill -9 -> next answered request (s)", []).append(time.monotonic() - started)
        with trio.fail_after(20):
            assert await fe.plug(A + kill * 8 * MiB, 2) == ResponseType.ACK
        if kill == 1:
            # QEMU gives the ring a new interrupt eventfd: the store must hand the next
            # successor that one, not the first (systemd adds an fd stored again under
            # a name, it does not replace it, and it hands the newest first).
            new_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            await fe.call_ack(Request.SET_VRING_CALL, vu.encode_u64(0), [new_call])
            os.close(fe.call_fd)
            fe.call_fd = new_call
        # The successor serves the kept connection before it says READY=1: a request
        # may be answered while the unit is still "activating".
        wait_until(lambda: box.show(SERVICE, "SubState")["SubState"] == "running", 20, "READY=1 after the restart")
        shown = box.show(SERVICE, "ActiveState", "SubState", "MainPID", "NRestarts", "NFileDescriptorStore")
        assert (shown["ActiveState"], shown["SubState"], shown["NRestarts"]) == ("active", "running", str(kill))
        assert int(shown["MainPID"]) not in pids
        pids.append(int(shown["MainPID"]))
        assert int(shown["NFileDescriptorStore"]) == STORED, shown
        status = await sync(box.ctl, VM, "status")
        assert status["pid"] == pids[-1] and status["resumed"]["count"] == kill and status["resumed"]["by"] == "restart"
        assert status["plugged_size"] == (8 + 4 * kill) * MiB and status["frontend"] == "attached"
    # A resize after the restarts reaches the driver through the kept backend channel.
    seen = fe.config_changes
    await sync(box.ctl, VM, "resize", "128M")
    with trio.fail_after(10):
        while fe.config_changes == seen:
            await trio.sleep(0.01)
    assert (await fe.get_config()).requested_size == 128 * MiB
    journal = box.journal(SERVICE)
    assert journal.count("resumed the front-end connection of a process that died") == 3, journal
    assert fe.dimm_allocated() <= 20 * MiB
    await done(fe)


async def test_systemctl_reload_upgrades_in_place(vm0, nursery):
    box = vm0
    fe = await attach(box, nursery)
    with trio.fail_after(20):
        assert await fe.plug(A, 4) == ResponseType.ACK
    before = box.show(SERVICE, "MainPID", "ExecMainStartTimestampMonotonic")
    gaps: list[float] = []
    reloading = True

    async def keep_asking():  # the guest's driver, asking all the time the reload runs
        last = time.monotonic()
        while reloading:
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    with trio.fail_after(120):
        async with trio.open_nursery() as asking:
            asking.start_soon(keep_asking)
            started = time.monotonic()
            result = await sync(box.systemctl, "reload", SERVICE)
            took = time.monotonic() - started
            await trio.sleep(0.2)
            reloading = False
    assert result.returncode == 0
    TIMINGS.setdefault("systemctl reload (s)", []).append(took)
    TIMINGS.setdefault("longest request wait during the reload (s)", []).append(max(gaps))
    after = box.show(SERVICE, "MainPID", "ActiveState", "SubState", "NRestarts", "NFileDescriptorStore",
                     "ExecMainStartTimestampMonotonic")
    assert after["MainPID"] == before["MainPID"]  # execve: the same process, systemd saw no death
    assert (after["ActiveState"], after["SubState"], after["NRestarts"]) == ("active", "running", "0"), after
    assert int(after["NFileDescriptorStore"]) == STORED, after
    status = await sync(box.ctl, VM, "status")
    assert status["pid"] == int(before["MainPID"]) and status["resumed"]["by"] == "upgrade"
    with trio.fail_after(20):
        assert await fe.plug(A + 8 * MiB, 2) == ResponseType.ACK
    journal = box.journal(SERVICE)
    assert "upgraded in place" in journal and "Reloaded" in journal, journal
    no_unit_trouble(box)
    # A kill after the upgrade still finds every fd in the store.
    await sync(box.systemctl, "kill", "--signal=KILL", SERVICE)
    with trio.fail_after(30):
        assert await fe.state(A + 8 * MiB, 2) == (ResponseType.ACK, BlockState.PLUGGED)
    await done(fe)


async def test_a_corrupted_state_file_fails_the_unit_with_status_2(vm0, nursery):
    box = vm0
    fe = await attach(box, nursery)
    with trio.fail_after(20):
        assert await fe.plug(A, 4) == ResponseType.ACK
    state = box.run_dir / f"{VM}.state"
    assert state.exists()
    state.write_bytes(state.read_bytes()[:40])  # truncated, as a torn write would leave it
    await sync(box.systemctl, "kill", "--signal=KILL", SERVICE)
    wait_until(lambda: box.show(SERVICE, "ActiveState")["ActiveState"] == "failed", 30, "the unit to fail")
    shown = box.show(SERVICE, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode", "NRestarts")
    # One restart after the kill; its exit status 2 is not restarted.
    assert shown == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2",
                     "ExecMainCode": "1", "NRestarts": "1"}, shown
    journal = box.journal(SERVICE)
    assert "cannot resume the front-end's connection: /run/vmemdev/vm0.state:" in journal, journal
    assert "To start afresh, stop the service and remove /run/vmemdev/vm0.state" in journal, journal
    assert state.exists()  # nothing removed behind the operator's back
    await done(fe)


async def test_systemctl_restart_ends_the_connection(vm0, nursery):
    """What an operator must not do under a running VM: a stop (or restart) is
    a clean exit, the daemon closes the front-end's connection and forgets
    its state, and systemd 252 empties the fd store at stop anyway (it has no
    FileDescriptorStorePreserve=). `systemctl reload` is the way to replace
    the daemon; this test pins down that restart is not."""
    box = vm0
    fe = await attach(box, nursery)
    with trio.fail_after(20):
        assert await fe.plug(A, 4) == ResponseType.ACK
    await sync(box.systemctl, "restart", SERVICE)
    with trio.fail_after(20):
        assert await fe.sock.recv(1) == b""  # QEMU would see its backend close
    assert box.show(SERVICE, "NFileDescriptorStore", "ActiveState") == {"NFileDescriptorStore": "0",
                                                                         "ActiveState": "active"}
    assert not (box.run_dir / f"{VM}.state").exists()
    await done(fe)
