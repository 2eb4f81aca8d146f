"""kill -9 of `vmemdev serve --state-file` under `vmemdev hold`, with a front-end
that keeps its connection and ring as QEMU does: the successor serves the same
connection, with the device state the dead process had, and answers a request
the dead process had decided as it decided it. Real processes and fds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio

from vmemdev.protocol.virtio_mem import BlockState, ResponseType
from vmemdev.testing.frontend import Frontend
from vmemdev.testing.processes import SyscallHold, only_child

from .test_holder import wait_for

VMEMDEV = [sys.executable, "-m", "vmemdev"]
MiB = 1 << 20
A = 1 << 32


class Held:
    """`vmemdev hold -- vmemdev serve --state-file ...` and a front-end attached to it."""

    def __init__(self, tmp_path, *serve_args: str, env: dict[str, str] | None = None, cwd: str | None = None,
                 hold_args: tuple[str, ...] = ()):
        self.dir = tmp_path
        self.sock = str(tmp_path / "vm0.sock")
        self.state = tmp_path / "vm0.state"
        self.log_path = tmp_path / "hold.log"
        self.proc = subprocess.Popen(
            VMEMDEV + ["hold", *hold_args, "--", *VMEMDEV, "serve", "--socket-path", self.sock,
                       "--state-file", str(self.state), "--requested-size", "64M", *serve_args],
            stderr=open(self.log_path, "w"), env=None if env is None else dict(os.environ, **env), cwd=cwd)
        wait_for(lambda: (tmp_path / "vm0.ctl").exists())

    def log(self) -> str:
        return self.log_path.read_text()

    def ctl(self, *args: str) -> dict:
        out = subprocess.run(VMEMDEV + ["ctl", "--control-socket", str(self.dir / "vm0.ctl"), "--json", *args],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    def worker(self) -> int:
        return wait_for(lambda: only_child(self.proc.pid))

    def kill_worker(self) -> int:
        pid = self.worker()
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        """After a failure: the worker too (it outlives a holder killed with SIGKILL)."""
        worker = only_child(self.proc.pid) if self.proc.poll() is None else None
        for pid in ([worker] if worker else []) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


async def attach(held: Held, nursery) -> Frontend:
    fe = Frontend(held.sock)
    await fe.realize()
    nursery.start_soon(fe.watch_backend_channel)
    await fe.start()
    return fe


async def test_kill_9_is_a_pause_for_the_front_end(tmp_path, nursery):
    held = Held(tmp_path)
    try:
        fe = await attach(held, nursery)
        assert await fe.plug(A, 4) == ResponseType.ACK
        first = held.kill_worker()
        # The same connection, never closed: the successor answers on it.
        with trio.fail_after(20):
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
            assert await fe.plug(A + 8 * MiB, 4) == ResponseType.ACK
            assert await fe.unplug(A, 4) == ResponseType.ACK
            assert await fe.state(A, 8) == (ResponseType.ACK, BlockState.MIXED)
        status = held.ctl("status")
        assert status["pid"] != first and status["resumed"]["count"] == 1
        # A second death: the count spans every process that served the connection.
        second = held.kill_worker()
        with trio.fail_after(20):
            assert await fe.state(A, 8) == (ResponseType.ACK, BlockState.MIXED)
        status = held.ctl("status")
        assert status["pid"] not in (first, second) and status["resumed"]["count"] == 2
        assert status["resumed"]["by"] == "restart"
        assert status["plugged_size"] == 8 * MiB and status["frontend"] == "attached"
        assert fe.dimm_allocated() <= 8 * MiB  # nothing allocated for unplugged blocks
        # A resize after the restart reaches the driver through the kept backend channel.
        seen = fe.config_changes
        held.ctl("resize", "128M")
        with trio.fail_after(10):
            while fe.config_changes == seen:
                await trio.sleep(0.01)
        assert (await fe.get_config()).requested_size == 128 * MiB
        assert "resumed the front-end connection" in held.log()
        # A clean end of the connection leaves nothing to resume.
        await fe.close()
        fe.release()
        wait_for(lambda: not held.state.exists() and not (tmp_path / "vm0.state.dev").exists())
        assert held.stop() == 0
    finally:
        held.kill()


@pytest.mark.parametrize("point, decided", [
    ("record-payload", False),  # the slot's payload written, not its crc: torn, the state before is read
    ("record-crc", True),  # the slot complete, the bitmap in the file not yet updated
    ("answer-saved", True),  # everything saved, the used ring not yet updated
])
async def test_a_request_decided_before_the_crash_is_answered_as_decided(tmp_path, nursery, point, decided):
    """The process dies at each step of saving a PLUG that changed the device,
    before the used ring shows it: the guest's PLUG is taken again by the
    successor. If the save was complete, its model already has the blocks
    plugged and deciding again would answer ERROR (Linux then marks the device
    broken): it answers the saved ACK. If the save was torn, the successor has
    the state before the PLUG and decides it again: ACK too."""
    marker = tmp_path / "crashed"
    held = Held(tmp_path, env={"VMEMDEV_CRASH_POINT": f"{point}:{marker}"})
    try:
        fe = await attach(held, nursery)
        with trio.fail_after(20):
            assert await fe.plug(A, 4) == ResponseType.ACK
        assert marker.exists()  # the first worker did die at that point
        log = held.log()
        assert f"crash point {point}" in log
        assert ("re-delivered after a restart" in log) == decided
        with trio.fail_after(20):
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
            assert await fe.state(A + 8 * MiB, 1) == (ResponseType.ACK, BlockState.UNPLUGGED)
            assert await fe.plug(A + 8 * MiB, 1) == ResponseType.ACK
        stats = held.ctl("stats")
        # The successor decided the re-delivered plug only when the dead process's save was torn.
        assert stats["requests"]["PLUG"] == {"ACK": 2 if not decided else 1}
        assert held.ctl("status")["plugged_size"] == 10 * MiB
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.kill()


async def test_an_unplug_killed_after_its_discard_is_finished_by_the_successor(tmp_path, nursery):
    """The process dies after the UNPLUG's discard, before the device state
    changed: the successor takes the request again, discards again (nothing
    left to give back) and answers ACK; state and host allocation agree."""
    marker = tmp_path / "crashed"
    held = Held(tmp_path, env={"VMEMDEV_CRASH_POINT": f"host-work-done:{marker}"})
    try:
        fe = await attach(held, nursery)
        assert await fe.plug(A, 4) == ResponseType.ACK  # no host work without --prealloc
        area, offset = fe.ram.gpa_area(A, 8 * MiB)
        area[offset:offset + 8 * MiB] = b"\x5a" * (8 * MiB)  # the guest uses what it was given
        assert fe.dimm_allocated() == 8 * MiB
        with trio.fail_after(20):
            assert await fe.unplug(A, 2) == ResponseType.ACK
        assert marker.exists() and "crash point host-work-done" in held.log()
        with trio.fail_after(20):
            assert await fe.state(A, 2) == (ResponseType.ACK, BlockState.UNPLUGGED)
            assert await fe.state(A + 4 * MiB, 2) == (ResponseType.ACK, BlockState.PLUGGED)
        status = held.ctl("status")
        assert status["plugged_size"] == 4 * MiB and status["resumed"]["count"] == 1
        assert fe.dimm_allocated() == 4 * MiB  # the kept blocks' data, nothing else
        assert area[offset + 4 * MiB:offset + 8 * MiB] == b"\x5a" * (4 * MiB)  # plugged data intact
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.kill()


async def test_a_prealloc_plug_killed_after_its_populate_is_served_again(tmp_path, nursery):
    """--prealloc: the process dies after populating a PLUG's blocks, before
    the device state changed. The successor gives back what the state calls
    unplugged, takes the PLUG again, populates and answers ACK."""
    marker = tmp_path / "crashed"
    held = Held(tmp_path, "--prealloc", env={"VMEMDEV_CRASH_POINT": f"host-work-done:{marker}"})
    try:
        fe = await attach(held, nursery)
        with trio.fail_after(20):
            assert await fe.plug(A, 4) == ResponseType.ACK
        log = held.log()
        assert marker.exists() and "crash point host-work-done" in log
        assert f"gave back {8 * MiB} bytes the dead process left allocated in unplugged blocks" in log
        status = held.ctl("status")
        assert status["plugged_size"] == 8 * MiB and held.ctl("stats")["requests"]["PLUG"] == {"ACK": 1}
        assert fe.dimm_allocated() == 8 * MiB
        assert held.ctl("accounting")["allocated_outside_plugged"] == 0
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.kill()


# strace's lines for the host work of a request on the blocks at A (file offset 0 of the DIMM):
# printed at the call's entry without its result, at its exit with it.
PUNCH = r"fallocate\(\d+, FALLOC_FL_KEEP_SIZE\|FALLOC_FL_PUNCH_HOLE, 0, {length}"
POPULATE = r"fallocate\(\d+, 0, 0, {length}"
HELD = {"enter": "", "exit": r"\) += 0"}


async def killed_inside(fe: Frontend, hold: SyscallHold, line: str, request) -> tuple[int, int]:
    """Send ``request`` (an awaitable of the front-end); once strace shows the
    worker inside the call ``line``, kill -9 it there. Returns the answer
    (the successor's) and what the DIMM had allocated at the kill."""
    answer: list[int] = []

    async def send() -> None:
        answer.append(await request)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await trio.to_thread.run_sync(hold.wait_output, line, 20)
                at_kill = fe.dimm_allocated()
                await trio.to_thread.run_sync(hold.kill)
    finally:
        hold.close()  # after a failure: strace lets the worker go
    return answer[0], at_kill


@pytest.mark.parametrize("at", ["enter", "exit"])
async def test_an_unplug_killed_inside_its_discard_is_finished_by_the_successor(tmp_path, nursery, strace, at):
    """kill -9 from outside while the UNPLUG's discard is inside its
    fallocate(PUNCH_HOLE), held there by strace: at the call's entry (nothing
    given back yet) or its exit (given back, the call not yet returned). The
    successor answers the re-delivered UNPLUG with ACK; the unplugged blocks
    hold no memory, the plugged ones keep their data."""
    held = Held(tmp_path)
    try:
        fe = await attach(held, nursery)
        assert await fe.plug(A, 4) == ResponseType.ACK
        area, offset = fe.ram.gpa_area(A, 8 * MiB)
        area[offset:offset + 8 * MiB] = b"\x5a" * (8 * MiB)  # the guest uses what it was given
        first = held.worker()
        hold = SyscallHold(first, "fallocate", at=at, strace=strace)
        answer, at_kill = await killed_inside(fe, hold, PUNCH.format(length=4 * MiB) + HELD[at],
                                              fe.unplug(A, 2))
        assert at_kill == (8 * MiB if at == "enter" else 4 * MiB)  # where the kill landed
        assert answer == ResponseType.ACK
        assert f"worker {first} died (signal SIGKILL)" in held.log()
        with trio.fail_after(20):
            assert await fe.state(A, 2) == (ResponseType.ACK, BlockState.UNPLUGGED)
            assert await fe.state(A + 4 * MiB, 2) == (ResponseType.ACK, BlockState.PLUGGED)
        status = held.ctl("status")
        assert status["pid"] != first and status["resumed"]["count"] == 1
        assert status["plugged_size"] == 4 * MiB
        assert held.ctl("stats")["requests"]["UNPLUG"] == {"ACK": 1}
        assert fe.dimm_extents() == [(4 * MiB, 4 * MiB)]  # the kept blocks' data, nothing else
        assert area[offset + 4 * MiB:offset + 8 * MiB] == b"\x5a" * (4 * MiB)
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.kill()


@pytest.mark.parametrize("at", ["enter", "exit"])
async def test_a_prealloc_plug_killed_inside_its_populate_is_served_again(tmp_path, nursery, strace, at):
    """--prealloc: kill -9 from outside while a PLUG's populate is inside its
    fallocate, held there by strace: at the entry (nothing allocated) or the
    exit (all allocated, the state not changed). The successor gives back
    what the dead process allocated for blocks its state calls unplugged,
    decides the PLUG again, populates and answers ACK."""
    held = Held(tmp_path, "--prealloc")
    try:
        fe = await attach(held, nursery)
        first = held.worker()
        hold = SyscallHold(first, "fallocate", at=at, strace=strace)
        answer, at_kill = await killed_inside(fe, hold, POPULATE.format(length=8 * MiB) + HELD[at],
                                              fe.plug(A, 4))
        assert at_kill == (0 if at == "enter" else 8 * MiB)
        assert answer == ResponseType.ACK
        log = held.log()
        assert f"worker {first} died (signal SIGKILL)" in log
        gave_back = f"gave back {8 * MiB} bytes the dead process left allocated in unplugged blocks"
        assert (gave_back in log) == (at == "exit")
        status = held.ctl("status")
        assert status["pid"] != first and status["resumed"]["count"] == 1
        assert status["plugged_size"] == 8 * MiB
        assert held.ctl("stats")["requests"]["PLUG"] == {"ACK": 1}
        assert fe.dimm_allocated() == 8 * MiB
        assert held.ctl("accounting")["allocated_outside_plugged"] == 0
        with trio.fail_after(20):
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.kill()


async def test_an_unplug_saved_but_not_copied_to_the_bitmap_is_not_undone(tmp_path, nursery):
    """UNPLUG dies after its slot is complete, before the file's bitmap shows
    it: the successor reads the blocks unplugged (it never discards a block
    the state calls plugged, nor calls plugged what the guest unplugged)."""
    markers = tmp_path / "crashed"
    markers.mkdir()
    marker = markers / "record-crc"
    marker.touch()  # disarmed for the plug
    held = Held(tmp_path, env={"VMEMDEV_CRASH_POINT": f"record-crc:{markers}"})
    try:
        fe = await attach(held, nursery)
        with trio.fail_after(20):
            assert await fe.plug(A, 4) == ResponseType.ACK
            marker.unlink()  # armed for the unplug
            assert await fe.unplug(A, 2) == ResponseType.ACK
            assert marker.exists()
            assert "re-delivered after a restart" in held.log()
            assert await fe.state(A, 2) == (ResponseType.ACK, BlockState.UNPLUGGED)
            assert await fe.state(A + 4 * MiB, 2) == (ResponseType.ACK, BlockState.PLUGGED)
        held.kill_worker()  # and once more: what the file says now is what the guest was told
        with trio.fail_after(20):
            assert await fe.state(A, 2) == (ResponseType.ACK, BlockState.UNPLUGGED)
            assert await fe.state(A + 4 * MiB, 2) == (ResponseType.ACK, BlockState.PLUGGED)
            assert await fe.unplug(A + 4 * MiB, 2) == ResponseType.ACK
        assert held.ctl("status")["plugged_size"] == 0
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.proc.kill()
        held.proc.wait()


async def test_a_plug_too_large_for_a_slot_is_saved_by_writing_the_record_anew(tmp_path, nursery):
    """4K blocks: a PLUG of 65535 blocks changes 8 KiB of bitmap, more than a
    slot holds; that save writes PATH.dev anew (same id) before the answer is
    published, and the successor has every block of it."""
    markers = tmp_path / "crashed"
    markers.mkdir()
    marker = markers / "answer-saved"
    marker.touch()  # disarmed for the first plug
    held = Held(tmp_path, "--block-size", "4K", "--requested-size", "512M",
                env={"VMEMDEV_CRASH_POINT": f"answer-saved:{markers}"})
    try:
        fe = await attach(held, nursery)
        with trio.fail_after(20):
            assert await fe.plug(A, 1) == ResponseType.ACK  # a slot
            marker.unlink()
            assert await fe.plug(A + 4096 * 7, 65535) == ResponseType.ACK  # the file anew, then the crash
        assert marker.exists() and "re-delivered after a restart" in held.log()
        with trio.fail_after(20):
            assert await fe.state(A + 4096 * 7, 65535) == (ResponseType.ACK, BlockState.PLUGGED)
            assert await fe.state(A + 4096, 6) == (ResponseType.ACK, BlockState.UNPLUGGED)
            assert await fe.unplug(A + 4096 * 7, 65535) == ResponseType.ACK  # all zeros: a slot again
        held.kill_worker()
        with trio.fail_after(20):
            assert await fe.state(A, 1) == (ResponseType.ACK, BlockState.PLUGGED)
            assert await fe.state(A + 4096 * 7, 65535) == (ResponseType.ACK, BlockState.UNPLUGGED)
        assert held.ctl("status")["plugged_size"] == 4096
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.proc.kill()
        held.proc.wait()


@pytest.mark.parametrize("damaged", ["state", "device record"])
async def test_a_corrupted_state_is_refused_naming_the_file(tmp_path, nursery, damaged):
    held = Held(tmp_path)
    try:
        fe = await attach(held, nursery)
        assert await fe.plug(A, 4) == ResponseType.ACK
        if damaged == "state":
            held.state.write_text('{"format": 1, "engine": {"truncated')
            named = f"{held.state}"
        else:
            record = tmp_path / "vm0.state.dev"
            raw = bytearray(record.read_bytes())
            raw[0] ^= 0xFF  # the magic
            record.write_bytes(raw)
            named = f"{record}: not a usable device record"
        held.kill_worker()
        assert held.proc.wait(timeout=20) == 2  # not restarted in a loop
        log = held.log()
        assert f"cannot resume the front-end's connection: {named}" in log
        assert f"remove {held.state}" in log and "not restarted" in log
        with trio.fail_after(10):
            assert await fe.sock.recv(1) == b""  # the connection is dropped, never misread
        fe.release()
    finally:
        held.kill()


def test_a_state_file_without_a_kept_connection_is_stale(tmp_path):
    """A fresh start (no fds kept) never reads an old state as this device's."""
    state = tmp_path / "vm0.state"
    state.write_text("left over from a VM long gone")
    (tmp_path / "vm0.state.dev").write_bytes(b"and its device record")
    proc = subprocess.Popen(VMEMDEV + ["serve", "--socket-path", str(tmp_path / "vm0.sock"),
                                       "--state-file", str(state)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "vm0.ctl").exists())
        assert not state.exists() and not (tmp_path / "vm0.state.dev").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "removing the stale state" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


async def test_an_fd_replaced_after_a_restart_is_the_one_the_next_successor_gets(tmp_path, nursery):
    """The fd store (systemd's, and `hold` as it) does not replace an fd stored
    again under the same name: it adds one. So a successor must remove the
    names it inherited before storing a replacement, or the next successor
    finds two "call0" and may take the stale one (systemd hands the newest
    first): its interrupts would reach nobody."""
    from vmemdev.protocol import vhost_user as vu
    from vmemdev.protocol.vhost_user import Request

    held = Held(tmp_path)
    try:
        fe = await attach(held, nursery)
        assert await fe.plug(A, 4) == ResponseType.ACK
        held.kill_worker()
        with trio.fail_after(20):
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
        new_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # QEMU changes the ring's interrupt
        await fe.call_ack(Request.SET_VRING_CALL, vu.encode_u64(0), [new_call])
        os.close(fe.call_fd)
        fe.call_fd = new_call
        with trio.fail_after(20):
            assert await fe.state(A, 4) == (ResponseType.ACK, BlockState.PLUGGED)
        held.kill_worker()
        with trio.fail_after(20):
            assert await fe.plug(A + 8 * MiB, 1) == ResponseType.ACK
        await fe.close()
        fe.release()
        assert held.stop() == 0
    finally:
        held.kill()
