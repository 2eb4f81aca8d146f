"""Issue 12, part 8: the daemon dies, or is upgraded, under a running guest
(QEMU 11.1 TCG, Linux 7.2), run the README's way for that:
``vmemdev hold -- vmemdev serve ... --state-file WORKDIR/vm0.state``.

  r1  kill -9 of the serving process with 512M plugged and data in it; then
      resize up and down (MemTotal follows, the data's hash is kept, host
      allocation within plugged blocks), then a guest reboot plugs again
      (where QEMU aborted when the connection had closed). Measured: kill ->
      the guest's next completed request.
  r2  the process dies (crash point host-work-done) right after an UNPLUG's
      discard, before its state changed: the guest's request completes after
      the restart, state and host allocation agree.
  r3  the same with --prealloc, after a PLUG's populate.
  r4  `vmemdev ctl upgrade` under the running guest: same pid, a pause.
  r5  a corrupted state file at the restart: refused, naming the file; the
      guest keeps its memory and data, nothing is discarded.
  r6  kill -9 from outside while the UNPLUG's discard is inside fallocate
      (PUNCH_HOLE), held at the call's entry by strace (delay injection): the
      test kills once strace printed the call. The guest's request completes
      after the restart (MemTotal follows the shrink, the pattern is kept),
      host allocation within plugged blocks. Measured: kill -> the held
      request completed.
  r7  the same with --prealloc, a PLUG held at the exit of its populate's
      fallocate (all allocated, the state not changed): the successor gives
      it back, then plugs again.
  r8  the process dies at each step of a vhost-user message (applied, reply
      kept, message taken off: daemon/inflight.py) during QEMU's handshake,
      and again during a guest reboot's reset: the guest plugs after each.

Every test also checks that the guest logged no virtio_mem error (conftest)
and QEMU no vhost error.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from vmemdev.testing.processes import SyscallHold

from .harness import MiB, allocated, mib, note, record

pytestmark = pytest.mark.e2e

KILLED = re.compile(r"worker \d+ died \(signal SIGKILL\)")
QEMU_BAD = re.compile(r"vhost|Assertion|Failed to|error", re.I)
PATTERN_MIB = 256


def write_pattern(lab) -> str:
    """PATTERN_MIB of distinct 4 MiB chunks in a tmpfs (it lands in hot-plugged
    movable memory); returns its sha256."""
    out = lab.check(
        "mkdir -p /fill && mount -t tmpfs -o size=1G tmpfs /fill && "
        "head -c 4194304 /dev/urandom > /run/seed && i=0 && "
        f"while [ $i -lt {PATTERN_MIB // 4} ]; do echo $i; cat /run/seed; i=$((i+1)); done > /fill/pattern"
        " && sha256sum /fill/pattern", timeout=600)
    return re.search(r"^([0-9a-f]{64})\s", out, re.M).group(1)


def pattern_hash(lab) -> str:
    return re.search(r"^([0-9a-f]{64})\s", lab.check("sha256sum /fill/pattern", timeout=600), re.M).group(1)


def check_qemu_clean(lab, where: str) -> None:
    text = lab.guest.qemu_log.read_text(errors="replace")
    bad = [line for line in text.splitlines() if QEMU_BAD.search(line)]
    if bad:
        lab.fail(f"{where}: QEMU logged:\n    " + "\n    ".join(bad[:20]))


def kill_worker(lab) -> tuple[int, float]:
    daemon = lab.device.daemon
    pid = daemon.worker_pid()
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def wait_new_worker(lab, old: int, timeout: float = 30.0) -> dict:
    """The successor's status, once its control socket answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = lab.device.daemon.status()
            if status["pid"] != old:
                return status
        except Exception:  # the control socket is not there yet
            pass
        if time.monotonic() > deadline:
            lab.fail(f"no serving process answered within {timeout:.0f}s of the kill")
        time.sleep(0.02)


def reboot_and_replug(lab, sc: str, what: str, timeout: float) -> None:
    """`reboot -f` in the guest; the new boot's driver plugs the 256M requested again."""
    g = lab.guest
    t0 = time.monotonic()
    g.serial.send("RUN reboot0 reboot -f")
    try:
        g.wait_ready(timeout)
    except Exception as exc:
        lab.fail(f"the guest did not come back from reboot -f {what}: {exc}")
    lab.boots += 1
    lab.wait_probe()
    lab.wait_target(256 * MiB, t0=t0, where=f"after the reboot {what}, requested 256M")
    record(sc, f"reboot -f {what} -> 256M plugged again", "vmemdev", time.monotonic() - t0)


def test_r1_kill_9_with_512m_plugged_then_resize_and_reboot(lab):
    sc = "r1: kill -9 under a running guest"
    lab.start("vmemdev", requested=512 * MiB, reboot=True, held=True, scenario=sc)
    lab.daemon_log_allow = KILLED
    lab.wait_target(512 * MiB, t0=lab.guest.t_start, where="boot with 512M requested")
    h1 = write_pattern(lab)
    lab.check_step("512M plugged, pattern written", 512 * MiB)
    a1 = allocated(lab.device.mem_path)

    old, t_kill = kill_worker(lab)
    status = wait_new_worker(lab, old)
    t_ctl = time.monotonic() - t_kill
    assert status["resumed"]["count"] == 1 and status["resumed"]["by"] == "restart", status["resumed"]
    assert status["plugged_size"] == 512 * MiB and status["frontend"] == "attached", status
    # The guest's next request: the PLUG that a resize asks for, as soon as we can ask.
    lab.device.resize(768 * MiB)
    deadline = time.monotonic() + 60
    while lab.device.sizes()[0] == 512 * MiB:
        if time.monotonic() > deadline:
            lab.fail("no PLUG completed within 60 s of the restart")
        time.sleep(0.01)
    t_first = time.monotonic() - t_kill
    record(sc, "kill -9 -> control socket answers again", "vmemdev", t_ctl)
    record(sc, "kill -9 -> the guest's next request completed", "vmemdev", t_first)
    lab.wait_target(768 * MiB, t0=t_kill, where="768M after the restart")
    lab.check_step("768M after the restart", 768 * MiB)
    lab.resize_and_wait(256 * MiB, scenario=sc, label="768M->256M after the restart",
                        timeout=600)
    lab.check_step("256M after the restart", 256 * MiB)
    h2 = pattern_hash(lab)
    assert h2 == h1, f"the pattern changed across the restart and the unplug: {h1} -> {h2}\n{lab.context()}"
    a2 = allocated(lab.device.mem_path)
    note(f"r1: kill -9 of pid {old}: control socket back after {t_ctl:.2f} s, the guest's next PLUG "
         f"completed {t_first:.2f} s after the kill; 512M -> 768M -> 256M after it, the "
         f"{PATTERN_MIB} MiB pattern kept, region allocated {mib(a1)} -> {mib(a2)}")
    check_qemu_clean(lab, "after the restart")
    lab.check_guest_clean("after the restart")

    # d: a guest reboot after the restart (QEMU aborted here when the connection had closed)
    g = lab.guest
    reboot_and_replug(lab, sc, "after the restart", 120)
    lab.resize_and_wait(512 * MiB, scenario=sc, label="after the reboot 256M->512M")
    lab.check_step("512M after the reboot", 512 * MiB)
    assert g.alive(), "QEMU exited at the reboot"
    status = lab.device.daemon.status()
    assert status["pid"] == lab.device.daemon.worker_pid() and status["resumed"]["count"] == 1, status
    assert "front-end detached" not in lab.device.daemon.log_text()
    check_qemu_clean(lab, "after the reboot")


def crash_inside(lab, sc: str, extra: tuple[str, ...], start: int, target: int, what: str) -> None:
    marker = lab.workdir / "crashed"
    lab.start("vmemdev", requested=start, held=True, daemon_args=extra, scenario=sc,
              daemon_env={"VMEMDEV_CRASH_POINT": f"host-work-done:{marker}"})
    lab.daemon_log_allow = KILLED
    if start:
        lab.wait_target(start, t0=lab.guest.t_start, where=f"boot with {mib(start)} requested")
        write_pattern(lab)
    first = lab.device.daemon.worker_pid()
    t0 = time.monotonic()
    lab.device.resize(target)
    lab.wait_target(target, t0=t0, where=f"{what}: {mib(start)} -> {mib(target)} across the crash",
                    timeout=600, every_poll="--prealloc" not in extra)
    took = time.monotonic() - t0
    assert marker.exists(), "the crash point was not reached"
    log = lab.device.daemon.log_text()
    assert "crash point host-work-done" in log and KILLED.search(log), log[-3000:]
    status = lab.device.daemon.status()
    assert status["pid"] != first and status["resumed"]["count"] == 1, status
    st = lab.check_step(f"{what}: after the restart", target)
    acc = lab.device.check_invariants(f"{what}: after the restart")
    record(sc, f"resize {mib(start)} -> {mib(target)} with a kill inside -> reached", "vmemdev", took)
    note(f"{sc}: the process died after the host work; the successor completed the guest's request: "
         f"{mib(start)} -> {mib(target)} in {took:.1f} s; region allocated {mib(st['file_allocated'])}, "
         f"outside plugged {acc['allocated_outside_plugged']} bytes"
         + ("; " + m.group(0) if (m := re.search(r"gave back \d+ bytes[^\n]*", log)) else ""))
    check_qemu_clean(lab, what)


def test_r2_kill_inside_an_unplug(lab):
    crash_inside(lab, "r2: kill -9 inside an UNPLUG", (), 512 * MiB, 256 * MiB, "UNPLUG")


def test_r3_kill_inside_a_prealloc_plug(lab):
    crash_inside(lab, "r3: kill -9 inside a --prealloc PLUG", ("--prealloc",), 0, 256 * MiB, "PLUG")


def test_r4_upgrade_in_place(lab):
    sc = "r4: upgrade in place"
    lab.start("vmemdev", requested=512 * MiB, held=True, scenario=sc)
    lab.wait_target(512 * MiB, t0=lab.guest.t_start, where="boot with 512M requested")
    h1 = write_pattern(lab)
    daemon = lab.device.daemon
    pid = daemon.worker_pid()
    t0 = time.monotonic()
    rc = daemon.ctl("upgrade")
    took = time.monotonic() - t0
    assert rc.returncode == 0 and "upgraded in place" in rc.stdout, rc.stdout + rc.stderr
    status = daemon.status()
    assert status["pid"] == pid and status["resumed"]["by"] == "upgrade", status
    assert daemon.worker_pid() == pid, "the holder saw its worker die"
    record(sc, "ctl upgrade -> serving again", "vmemdev", took)
    lab.resize_and_wait(768 * MiB, scenario=sc, label="512M->768M after the upgrade")
    lab.resize_and_wait(256 * MiB, scenario=sc, label="768M->256M after the upgrade", timeout=600)
    lab.check_step("256M after the upgrade", 256 * MiB)
    assert pattern_hash(lab) == h1, "the pattern changed across the upgrade"
    note(f"r4: `vmemdev ctl upgrade`: {rc.stdout.strip()!r} ({took:.2f} s with the ctl's own start); "
         "then 512M -> 768M -> 256M, pattern kept")
    check_qemu_clean(lab, "after the upgrade")


def test_r5_a_corrupted_state_is_refused_and_nothing_is_discarded(lab):
    sc = "r5: corrupted state at the restart"
    lab.start("vmemdev", requested=512 * MiB, held=True, scenario=sc)
    lab.wait_target(512 * MiB, t0=lab.guest.t_start, where="boot with 512M requested")
    h1 = write_pattern(lab)
    daemon = lab.device.daemon
    lab.check_step("before", 512 * MiB)
    a1 = allocated(lab.device.mem_path)
    total = lab.memtotal()
    daemon.state_path.write_text('{"format": 1, "engine": {"trunc')
    kill_worker(lab)
    try:
        status = daemon.proc.wait(30)
    except Exception:
        lab.fail("vmemdev hold did not end after its worker refused the state")
    assert status == 2, f"hold exited with {status}"
    daemon.expected_exit = 2
    log = daemon.log_text()
    assert f"cannot resume the front-end's connection: {daemon.state_path}" in log, log[-2000:]
    assert f"remove {daemon.state_path}" in log
    lab.daemon_log_allow = re.compile(KILLED.pattern + r"|cannot resume the front-end's connection|"
                                      r"exited with status 2 \(usage or state error\)")
    # The guest lives on with all it had: its memory is QEMU's mapping, nothing was discarded.
    assert lab.guest.alive()
    assert lab.memtotal() == total
    assert pattern_hash(lab) == h1
    a2 = allocated(lab.device.mem_path)
    assert a2 >= a1, f"memory was discarded: {mib(a1)} -> {mib(a2)}"
    note(f"r5: a truncated state file: the successor refused it and exited 2 naming the file, `hold` "
         f"ended; the guest kept MemTotal, its pattern and the region's {mib(a2)}")


def kill_inside_syscall(lab, strace: str, sc: str, extra: tuple[str, ...], start: int, target: int,
                        what: str, line: str, at: str) -> None:
    """The guest's request held inside its host work's fallocate by strace
    (at the call's entry or its exit), the serving process killed there from
    outside once strace printed the call; the successor must complete it."""
    lab.start("vmemdev", requested=start, held=True, daemon_args=extra, scenario=sc)
    lab.daemon_log_allow = KILLED
    h1 = None
    if start:
        lab.wait_target(start, t0=lab.guest.t_start, where=f"boot with {mib(start)} requested")
        h1 = write_pattern(lab)
    first = lab.device.daemon.worker_pid()
    hold = SyscallHold(first, "fallocate", at=at, strace=strace)
    try:
        t0 = time.monotonic()
        lab.device.resize(target)
        try:
            held = hold.wait_output(line, timeout=300).group(0)
        except (TimeoutError, RuntimeError) as exc:
            lab.fail(f"{what}: the daemon was not seen inside fallocate: {exc}")
        at_kill = allocated(lab.device.mem_path)
        t_kill = time.monotonic()
        hold.kill()
    finally:
        hold.close()
    status = wait_new_worker(lab, first)
    t_ctl = time.monotonic() - t_kill
    assert status["resumed"]["count"] == 1 and status["resumed"]["by"] == "restart", status["resumed"]
    # The request that was in flight at the kill, taken again and answered by the successor.
    deadline = time.monotonic() + 60
    while lab.device.sizes()[0] == start:
        if time.monotonic() > deadline:
            lab.fail(f"{what}: the request held at the kill did not complete within 60 s of the restart")
        time.sleep(0.01)
    t_first = time.monotonic() - t_kill
    lab.wait_target(target, t0=t0, where=f"{what}: {mib(start)} -> {mib(target)} across the kill",
                    timeout=600, every_poll="--prealloc" not in extra)
    took = time.monotonic() - t0
    log = lab.device.daemon.log_text()
    assert f"worker {first} died (signal SIGKILL)" in log, log[-3000:]
    if "--prealloc" in extra and at == "exit":  # the dead process had populated, for blocks still unplugged
        assert f"gave back {at_kill} bytes" in log, log[-3000:]
    st = lab.check_step(f"{what}: after the restart", target)
    acc = lab.device.check_invariants(f"{what}: after the restart")
    if h1 is not None:
        h2 = pattern_hash(lab)
        assert h2 == h1, f"the pattern changed across the kill inside the {what}: {h1} -> {h2}"
    record(sc, "kill -9 -> control socket answers again", "vmemdev", t_ctl)
    record(sc, "kill -9 -> the guest's next request completed", "vmemdev", t_first)
    record(sc, f"resize {mib(start)} -> {mib(target)} with a kill inside -> reached", "vmemdev", took)
    note(f"{sc}: strace showed `{held.split('] ')[-1]}`, region allocated {mib(at_kill)}; kill -9 of pid "
         f"{first} {t_kill - t0:.1f} s after the resize: control socket back after {t_ctl:.2f} s, the held "
         f"request completed {t_first:.2f} s after the kill; {mib(start)} -> {mib(target)} in {took:.1f} s; "
         f"region allocated {mib(st['file_allocated'])}, outside plugged {acc['allocated_outside_plugged']} bytes"
         + ("; pattern kept" if h1 is not None else "")
         + ("; " + m.group(0) if (m := re.search(r"gave back \d+ bytes[^\n]*", log)) else ""))
    check_qemu_clean(lab, what)


def test_r6_kill_inside_the_discard_held_there_by_strace(lab, strace):
    kill_inside_syscall(lab, strace, "r6: kill -9 inside an UNPLUG's discard (strace)", (), 512 * MiB,
                        256 * MiB, "UNPLUG", r"fallocate\(\d+, FALLOC_FL_KEEP_SIZE\|FALLOC_FL_PUNCH_HOLE, \d+, \d+",
                        "enter")


def test_r7_kill_inside_a_prealloc_populate_held_there_by_strace(lab, strace):
    kill_inside_syscall(lab, strace, "r7: kill -9 inside a --prealloc PLUG's populate (strace)", ("--prealloc",),
                        0, 256 * MiB, "PLUG", r"fallocate\(\d+, 0, \d+, \d+\) += 0", "exit")


MESSAGE_POINTS = ("message-applied", "reply-owed", "message-consumed")  # daemon/inflight.py's steps


def test_r8_deaths_inside_vhost_user_messages(lab):
    """The serving process dies once at each step of a vhost-user message
    while QEMU realizes the device and the guest's driver starts it, and
    again during a guest reboot's reset: each is a pause."""
    sc = "r8: kill -9 inside vhost-user messages"
    markers = lab.workdir / "message-crashes"
    markers.mkdir()
    t0 = time.monotonic()
    lab.start("vmemdev", requested=256 * MiB, reboot=True, held=True, scenario=sc,
              daemon_env={"VMEMDEV_CRASH_POINT": f"{','.join(MESSAGE_POINTS)}:{markers}"})
    lab.daemon_log_allow = KILLED
    lab.wait_target(256 * MiB, t0=lab.guest.t_start, where="boot with 256M requested, three deaths in the handshake")
    record(sc, "QEMU start -> 256M plugged, with three deaths inside its messages", "vmemdev",
           time.monotonic() - t0)
    assert sorted(p.name for p in markers.iterdir()) == sorted(MESSAGE_POINTS)
    log = lab.device.daemon.log_text()
    assert len(KILLED.findall(log)) == 3, log[-3000:]
    status = lab.device.daemon.status()
    assert status["resumed"]["count"] == 3 and status["frontend"] == "attached", status
    check_qemu_clean(lab, "after the deaths in the handshake")
    lab.check_guest_clean("after the deaths in the handshake")

    for marker in markers.iterdir():  # armed again: the reboot's reset messages meet them
        marker.unlink()
    g = lab.guest
    reboot_and_replug(lab, sc, "with three deaths inside its messages", 180)
    assert sorted(p.name for p in markers.iterdir()) == sorted(MESSAGE_POINTS)
    lab.resize_and_wait(512 * MiB, scenario=sc, label="after the reboot 256M->512M")
    lab.check_step("512M after the reboot", 512 * MiB)
    status = lab.device.daemon.status()
    assert status["resumed"]["count"] == 6, status
    assert g.alive() and "front-end detached" not in lab.device.daemon.log_text()
    log = lab.device.daemon.log_text()
    note(f"r8: three deaths inside QEMU's vhost-user messages at start and three inside the reboot's: "
         f"{log.count('handling it again')} message(s) handled again, "
         f"{log.count('the dead process owed')} owed reply(ies) sent by a successor; "
         "the guest plugged 256M after each and 512M after")
    check_qemu_clean(lab, "after the reboot")
