#!/usr/bin/env python3
"""Record a vhost-user capture of vmemdev driving a real Linux guest in QEMU.

    .venv/bin/python tests/e2e/record_capture.py [--out PATH] [--builtin]

Starts vmemdev in-process (trio, main thread) on a socket in a fresh work
directory under /tmp/vmemdev-guestlab, with ``trace_path`` set, boots the
guestlab guest (QEMU 11.1.3 TCG, Linux 7.2) through ``scripts/guestlab qemu``
with the command line of /work/shared/docs/real-guest-e2e.md::

    -accel tcg,thread=multi -cpu max -smp 2 -no-reboot -m 512M,maxmem=8G,slots=2
    -kernel ... -initrd ... -append "console=ttyS0 quiet acpi_no_memhotplug"
    -object memory-backend-memfd,id=ram,size=512M,share=on -machine memory-backend=ram
    -object memory-backend-file,id=hp0,size=1G,share=on,mem-path=WORKDIR/hp0.mem
    -device pc-dimm,id=dimm0,memdev=hp0,addr=0x100000000
    -chardev socket,id=c0,path=WORKDIR/vm0.sock
    -device vhost-user-test-device-pci,chardev=c0,virtio-id=24,num_vqs=1,config_size=56

(``-nographic`` is replaced by ``-display none``: smoke.boot() adds its own
serial console and QMP socket; --nodefaults also drops QEMU's default VGA and
NIC, which makes guest RAM one memory region instead of two), then walks the requested size
256M (at start) -> 512M -> 128M -> 0 through ``DeviceRuntime.resize``. At each
step it waits (bounded) until the guest's MemTotal is base + requested and
the device's plugged_size equals requested_size, and records MemTotal, the
device sizes and the DIMM file's allocated bytes (st_blocks * 512), checking
allocated <= plugged. At 512M it also fills a tmpfs file in the guest
(--touch-mib) so the later shrink proves that unplugged memory really goes
back to the host. Then it greps the guest's dmesg for virtio_mem errors,
powers the guest off and measures whether and when QEMU exits; if QEMU does
not exit it collects what QEMU is waiting for (QMP query-status, kernel
stacks, gdb backtraces, a short strace) into WORKDIR/poweroff-debug.txt.

The trace (every vhost-user message as JSON lines, see
/work/shared/captures/README.md, plus "channel") is written to WORKDIR and
copied to --out (default tests/data/vmemdev-qemu-11.1.3-linux-7.2.jsonl)
once all resize steps passed.

--builtin runs the same steps against QEMU's own virtio-mem-pci (resize via
QMP qom-set, device region a memory-backend-file in WORKDIR so allocation is
measured the same way) for a side-by-side timing; it records no trace.

Exit status 0 when every check passed, 1 otherwise. Needs root and a
provisioned guestlab (scripts/guestlab provision).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e" / "guest"))
import smoke  # noqa: E402  (tests/e2e/guest/smoke.py)

from vmemdev.daemon.runtime import DeviceRuntime  # noqa: E402
from vmemdev.daemon.vhost_server import serve  # noqa: E402
from vmemdev.protocol import vhost_user as vu  # noqa: E402
from vmemdev.virtio_mem.model import Geometry  # noqa: E402

MiB = 1 << 20
REGION_ADDR = 0x1_0000_0000
REGION_SIZE = 1 << 30
BLOCK_SIZE = 2 * MiB
DEFAULT_OUT = REPO / "tests" / "data" / "vmemdev-qemu-11.1.3-linux-7.2.jsonl"
STEPS_MIB = (256, 512, 128, 0)  # the first is the requested size at start
TOL_KB = 4096  # MemTotal tolerance


class CheckFailed(Exception):
    pass


class Interrupted(Exception):
    pass


@dataclass
class Step:
    name: str
    requested_mib: int
    t_from: str = ""  # what the times are measured from
    t_first_change: float | None = None  # s until MemTotal first moved
    t_memtotal: float | None = None  # s until MemTotal reached the target
    t_plugged: float | None = None  # s until the device's plugged == requested
    memtotal_kb: int = 0
    delta_mib: float = 0.0
    plugged: int = 0
    requested: int = 0
    usable: int = 0
    allocated: int = 0
    notes: list[str] = field(default_factory=list)
    ok: bool = True


def say(msg: str) -> None:
    print(f"[record] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def mib(n: int) -> str:
    return f"{n / MiB:.0f}M" if n % MiB == 0 else f"{n / MiB:.1f}M"


# --------------------------------------------------------------------------
# The device under test: vmemdev (in-process) or QEMU's own virtio-mem-pci.
# --------------------------------------------------------------------------


class VmemdevDevice:
    """Access to the in-process DeviceRuntime from the scenario thread."""

    kind = "vmemdev"

    def __init__(self, service: DeviceRuntime, socket_path: Path, mem_path: Path):
        self.service = service
        self.socket_path = socket_path
        self.mem_path = mem_path

    def qemu_device_args(self) -> list[str]:
        return [
            "-object", f"memory-backend-file,id=hp0,size={REGION_SIZE >> 20}M,share=on,"
                       f"mem-path={self.mem_path}",
            "-device", f"pc-dimm,id=dimm0,memdev=hp0,addr={REGION_ADDR:#x}",
            "-chardev", f"socket,id=c0,path={self.socket_path}",
            "-device", "vhost-user-test-device-pci,chardev=c0,virtio-id=24,num_vqs=1,"
                       "config_size=56",
        ]

    def attach(self, guest) -> None:
        pass

    def resize(self, size: int) -> None:
        trio.from_thread.run_sync(self.service.resize, size)

    def sizes(self) -> tuple[int, int, int]:
        def get():
            d = self.service.device
            return d.plugged_size, d.requested_size, d.usable_region_size

        return trio.from_thread.run_sync(get)


class BuiltinDevice:
    """QEMU's own virtio-mem-pci (id vmem0), driven over QMP."""

    kind = "builtin virtio-mem-pci"
    PATH = "/machine/peripheral/vmem0"

    def __init__(self, mem_path: Path, requested: int):
        self.mem_path = mem_path
        self.requested = requested
        self.guest = None

    def qemu_device_args(self) -> list[str]:
        return [
            "-object", f"memory-backend-file,id=vm0,size={REGION_SIZE >> 20}M,share=on,"
                       f"mem-path={self.mem_path}",
            "-device", f"virtio-mem-pci,id=vmem0,memdev=vm0,requested-size={self.requested},"
                       f"block-size={BLOCK_SIZE}",
        ]

    def attach(self, guest) -> None:
        self.guest = guest

    def _get(self, prop: str) -> int:
        return int(self.guest.qmp("qom-get", {"path": self.PATH, "property": prop}))

    def resize(self, size: int) -> None:
        self.guest.qmp("qom-set", {"path": self.PATH, "property": "requested-size", "value": size})

    def sizes(self) -> tuple[int, int, int]:
        # plugged ("size"), requested; QEMU has no QOM property for usable_region_size
        return self._get("size"), self._get("requested-size"), -1


# --------------------------------------------------------------------------
# The scenario (runs in a worker thread; the guest helpers block).
# --------------------------------------------------------------------------


def qemu_args(info: dict, dev, nodefaults: bool = False, extra=()) -> list[str]:
    # The documented line has -nographic; smoke.boot() brings its own serial
    # console and QMP, so -display none gives the same machine (default VGA and
    # NIC included: the VGA window splits guest RAM into two memory regions).
    return [
        *info["accel_args"], "-smp", "2", *(["-nodefaults"] if nodefaults else []),
        "-display", "none", "-no-reboot",
        "-m", "512M,maxmem=8G,slots=2",
        "-kernel", info["kernel"], "-initrd", info["initrd"], "-append", info["kernel_cmdline"],
        "-object", "memory-backend-memfd,id=ram,size=512M,share=on",
        "-machine", "memory-backend=ram",
        *dev.qemu_device_args(),
        *extra,
    ]


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class Scenario:
    def __init__(self, args, dev, workdir: Path, trace_path: Path | None,
                 stop: threading.Event, shared: dict):
        self.args = args
        self.dev = dev
        self.workdir = workdir
        self.trace_path = trace_path
        self.stop = stop
        self.shared = shared  # "guest": for the main thread's cleanup
        self.steps: list[Step] = []
        self.failures: list[str] = []
        self.facts: dict[str, object] = {}
        self.timings: dict[str, float] = {}
        self.poweroff: dict[str, object] = {}
        self.dmesg_virtio_mem = ""
        self.dmesg_bad: list[str] = []
        self.steps_passed = False

    def fail(self, msg: str) -> None:
        say(f"FAIL: {msg}")
        self.failures.append(msg)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted")

    # -- helpers ----------------------------------------------------------
    def memtotal(self, g) -> int:
        return g.meminfo()["MemTotal"]

    def wait_step(self, g, step: Step, base_kb: int, t0: float, before_kb: int | None,
                  timeout: float) -> None:
        """Poll MemTotal and the device until both match requested (bounded)."""
        want_kb = base_kb + step.requested_mib * 1024
        want = step.requested_mib * MiB
        deadline = t0 + timeout
        last_kb = None
        plugged = None
        while True:
            self.check_stop()
            if not g.alive():
                raise CheckFailed(f"{step.name}: QEMU exited (status {g.proc.poll()}) while "
                                  f"waiting; see {g.qemu_log}")
            last_kb = self.memtotal(g)
            now = time.monotonic()
            if (step.t_first_change is None and before_kb is not None
                    and last_kb != before_kb):
                step.t_first_change = now - t0
            if step.t_memtotal is None and abs(last_kb - want_kb) <= TOL_KB:
                step.t_memtotal = now - t0
            plugged, requested, _ = self.dev.sizes()
            if step.t_plugged is None and plugged == want:
                step.t_plugged = time.monotonic() - t0
            if step.t_memtotal is not None and step.t_plugged is not None:
                # both reached; make sure MemTotal did not move on
                if abs(last_kb - want_kb) <= TOL_KB and plugged == want:
                    return
            if now > deadline:
                raise CheckFailed(
                    f"{step.name}: within {timeout:.0f}s the guest did not follow: MemTotal "
                    f"{last_kb} kB (base {base_kb} kB, want {want_kb} kB ± {TOL_KB}; "
                    f"delta {(last_kb - base_kb) / 1024:+.1f} MiB), device plugged "
                    f"{mib(plugged)} requested {mib(requested)}")
            time.sleep(0.1)

    def record(self, g, step: Step, base_kb: int) -> None:
        step.memtotal_kb = self.memtotal(g)
        step.delta_mib = (step.memtotal_kb - base_kb) / 1024
        step.plugged, step.requested, step.usable = self.dev.sizes()
        step.allocated = allocated(self.dev.mem_path)
        if step.allocated > step.plugged:
            step.ok = False
            self.fail(f"{step.name}: DIMM file has {step.allocated} bytes allocated, more than "
                      f"the {step.plugged} bytes plugged")
        if step.requested != step.requested_mib * MiB:
            step.ok = False
            self.fail(f"{step.name}: device requested_size {step.requested}, expected "
                      f"{step.requested_mib * MiB}")
        say(f"{step.name}: MemTotal {step.memtotal_kb} kB ({step.delta_mib:+.1f} MiB), "
            f"plugged {mib(step.plugged)}, requested {mib(step.requested)}, "
            f"usable {mib(step.usable) if step.usable >= 0 else '?'}, "
            f"DIMM allocated {step.allocated / MiB:.1f} MiB; "
            f"memtotal after {step.t_memtotal:.2f}s, plugged after {step.t_plugged:.2f}s "
            f"(from {step.t_from})")

    def trace_count(self) -> int:
        if self.trace_path is None or not self.trace_path.exists():
            return 0
        with open(self.trace_path, "rb") as f:
            return sum(1 for _ in f)

    # -- the run -----------------------------------------------------------
    def run(self) -> None:
        info = smoke.guestlab_info()
        self.facts["qemu"] = info["versions"]["qemu"]
        self.facts["kernel"] = info["versions"]["kernel_release"]
        say(f"QEMU {self.facts['qemu']}, guest kernel {self.facts['kernel']}, "
            f"device: {self.dev.kind}, workdir {self.workdir}")
        t_boot = time.monotonic()
        g = smoke.boot(qemu_args(info, self.dev, self.args.nodefaults, self.args.qemu_arg),
                       workdir=self.workdir,
                       ready_timeout=self.args.ready_timeout)
        self.shared["guest"] = g
        try:
            self.dev.attach(g)
            self.timings["QEMU start -> agent ready"] = g.t_ready - g.t_start
            say(f"agent ready after {g.t_ready - g.t_start:.2f}s: {g.ready_line}")
            g.qmp("query-status")  # connect QMP now, while QEMU is healthy
            self._steps(g)
            self.steps_passed = not self.failures
            self._dmesg(g)
            self._poweroff(g)
        finally:
            if g.alive():
                say(f"killing QEMU (pid {g.proc.pid})")
            g.close()
            self.shared.pop("guest", None)
        self.timings["total"] = time.monotonic() - t_boot

    def _steps(self, g) -> None:
        before = {k: int(v) for k, v in re.findall(
            r"^(\S+):\s+(\d+)", g.check("cat /run/guestlab/meminfo.before-modules"), re.M)}
        base_kb = before["MemTotal"]
        self.facts["MemTotal before virtio_mem (kB)"] = base_kb
        say(f"MemTotal before virtio_mem: {base_kb} kB")

        # step 1: requested at start (the driver plugs while the guest boots)
        first = Step("start", self.args.steps[0], t_from="QEMU start")
        self.wait_step(g, first, base_kb, g.t_start, None, self.args.step_timeout + 120)
        self.record(g, first, base_kb)
        first.notes.append("times are upper bounds: the first poll is after the agent is up; "
                           "see the dmesg timestamps for when the driver plugged")
        self.steps.append(first)
        st, probe = g.run("dmesg | grep -i virtio_mem")
        self.facts["probe"] = probe.strip()
        say("driver: " + probe.strip().replace("\n", "\n    "))

        for target in self.args.steps[1:]:
            step = Step(f"resize {target}M", target, t_from="resize()")
            before_kb = self.memtotal(g)
            t0 = time.monotonic()
            self.dev.resize(target * MiB)
            self.wait_step(g, step, base_kb, t0, before_kb, self.args.step_timeout)
            self.record(g, step, base_kb)
            self.steps.append(step)
            if target == 512 and self.args.touch_mib:
                self._touch(g, step)

    def _touch(self, g, step: Step) -> None:
        """Fill guest tmpfs so pages in the plugged memory are really allocated on
        the host; the later shrink must give them back."""
        n = self.args.touch_mib
        a0 = allocated(self.dev.mem_path)
        t = time.monotonic()
        g.check(f"dd if=/dev/zero of=/tmp/fill bs=1M count={n} 2>/dev/null", timeout=300)
        a1 = allocated(self.dev.mem_path)
        plugged = self.dev.sizes()[0]
        g.check("rm -f /tmp/fill")
        note = (f"filled {n} MiB of guest tmpfs in {time.monotonic() - t:.1f}s: DIMM allocated "
                f"{a0 / MiB:.1f} -> {a1 / MiB:.1f} MiB (plugged {mib(plugged)}); file removed")
        step.notes.append(note)
        say(note)
        self.facts["DIMM allocated after guest fill (MiB)"] = round(a1 / MiB, 1)
        if a1 > plugged:
            step.ok = False
            self.fail(f"after the fill: DIMM allocated {a1} > plugged {plugged}")

    def _dmesg(self, g) -> None:
        dm = g.dmesg()
        (self.workdir / "guest-dmesg.txt").write_text(dm)
        self.dmesg_virtio_mem = "\n".join(l for l in dm.splitlines() if "virtio_mem" in l)
        self.dmesg_bad = [l for l in dm.splitlines()
                          if re.search(r"WARNING|BUG|Call Trace|error|fail|timeout|refus",
                                       l, re.I)]
        vm_bad = [l for l in self.dmesg_bad if "virtio" in l.lower()]
        if vm_bad:
            self.fail("guest dmesg has virtio errors:\n    " + "\n    ".join(vm_bad))

    def _poweroff(self, g) -> None:
        po = self.poweroff
        po["plugged at poweroff"] = mib(self.dev.sizes()[0])
        # let the kernel's shutdown messages reach the console (console.log)
        g.run("echo 7 > /proc/sys/kernel/printk")
        self.console_mark = len(g.serial.lines)
        n_before = self.trace_count()
        t_wall = time.time()
        t = time.monotonic()
        try:
            g.request("POWEROFF", "", timeout=30)
        except smoke.GuestError as e:
            po["agent"] = f"no reply: {e}"
        po["agent reply after (s)"] = round(time.monotonic() - t, 2)
        timeout = self.args.poweroff_timeout
        try:
            rc = g.proc.wait(timeout=max(0.1, timeout - (time.monotonic() - t)))
            po["exited"] = True
            po["exit status"] = rc
            po["poweroff -> QEMU exit (s)"] = round(time.monotonic() - t, 2)
            self.timings["poweroff -> QEMU exit"] = time.monotonic() - t
            say(f"QEMU exited with status {rc} {time.monotonic() - t:.2f}s after POWEROFF")
            if rc != 0:
                self.fail(f"QEMU exit status {rc} after poweroff")
        except subprocess.TimeoutExpired:
            po["exited"] = False
            self.fail(f"QEMU did not exit within {timeout:.0f}s of the guest's poweroff -f")
            self._debug_hang(g, po)
        po["trace messages during poweroff"] = self._trace_since(t_wall, n_before)
        po["guest console during poweroff"] = g.serial.lines[self.console_mark:][-40:]
        with contextlib.suppress(OSError):
            po["qemu.log"] = g.qemu_log.read_text(errors="replace").strip()
        if g._qmp is not None and g._qmp.events:
            po["QMP events"] = [e.get("event") for e in g._qmp.events]

    def _trace_since(self, t_wall: float, n_before: int) -> list[str]:
        if self.trace_path is None or not self.trace_path.exists():
            return []
        out = []
        with open(self.trace_path) as f:
            for i, line in enumerate(f):
                if i < n_before:
                    continue
                d = json.loads(line)
                out.append(describe(d, t_wall))
        return out

    def _debug_hang(self, g, po: dict) -> None:
        """QEMU is still running after poweroff: find out what it waits for."""
        pid = g.proc.pid
        lines = [f"QEMU pid {pid} still running {time.monotonic() - g.t_start:.1f}s after start"]
        # Is the main loop alive? (QMP is served by the main loop)
        try:
            st = g.qmp("query-status", timeout=5)
            po["QMP query-status"] = st
            lines.append(f"QMP query-status: {st}")
        except smoke.GuestError as e:
            po["QMP query-status"] = f"no answer: {e}"
            lines.append(f"QMP query-status: no answer ({e}) -> the main loop is blocked")
        lines.append(f"\n--- /proc/{pid}/status ---")
        with contextlib.suppress(OSError):
            lines.append(Path(f"/proc/{pid}/status").read_text())
        for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
            def rd(name, task=task):
                try:
                    return (task / name).read_text().strip()
                except OSError as e:
                    return f"({e})"
            stat = rd("stat")
            state = stat.rpartition(")")[2].split()[0] if ")" in stat else "?"
            lines.append(f"\n--- thread {task.name} {rd('comm')} wchan={rd('wchan')} "
                         f"state={state}")
            lines.append(f"syscall: {rd('syscall')}")
            lines.append(rd("stack"))
        lines.append("\n--- fds ---")
        with contextlib.suppress(OSError):
            for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
                with contextlib.suppress(OSError):
                    lines.append(f"{fd} -> {os.readlink(f'/proc/{pid}/fd/{fd}')}")
        for cmd, tmo in (
            # QEMU runs chrooted: let gdb take the libraries from QEMU's root
            (["gdb", "-p", str(pid), "-batch", "-nx", "-ex", "set pagination off",
              "-ex", f"set sysroot /proc/{pid}/root",
              "-ex", "thread apply all bt"], 120),
            (["strace", "-f", "-tt", "-p", str(pid)], 3),
        ):
            if shutil.which(cmd[0]) is None:
                lines.append(f"\n--- {cmd[0]}: not installed")
                continue
            lines.append(f"\n--- {' '.join(cmd)} ---")
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=tmo)
                lines.append(r.stdout + r.stderr)
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"") + (e.stderr or b"")
                lines.append((out.decode(errors="replace") if isinstance(out, bytes) else out)
                             + f"\n(stopped after {tmo}s)")
        text = "\n".join(lines)
        path = self.workdir / "poweroff-debug.txt"
        path.write_text(text)
        po["debug file"] = str(path)
        say(f"QEMU hang diagnostics in {path}")


def describe(d: dict, t0: float) -> str:
    req = d["request"]
    if d.get("channel", "main") == "backend":
        name = {2: "CONFIG_CHANGE_MSG"}.get(req, str(req))
    else:
        name = vu.request_name(req)
    arrow = "->" if d["dir"] == "frontend->backend" else "<-"
    return (f"{d['t'] - t0:+8.3f}s {d.get('channel', 'main'):7s} {arrow} {name} "
            f"flags={d['flags']:#x} payload={d['payload'][:48]} nfds={d['nfds']}")


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def fmt_t(t: float | None) -> str:
    return "-" if t is None else f"{t:.2f}"


def summary(sc: Scenario, trace_out: Path | None, trace_n: int) -> str:
    out = []
    out.append(f"\n=== {sc.dev.kind}: QEMU {sc.facts.get('qemu')}, Linux {sc.facts.get('kernel')} "
               f"(TCG, smp 2, block 2M, region 1G @ {REGION_ADDR:#x})")
    out.append(f"base MemTotal (before virtio_mem): {sc.facts.get('MemTotal before virtio_mem (kB)')}"
               f" kB")
    hdr = (f"{'step':12s} {'requested':>9s} {'MemTotal Δ':>11s} {'plugged':>8s} {'usable':>7s} "
           f"{'host alloc':>10s} {'alloc≤plug':>10s} {'t MemTotal moves':>16s} "
           f"{'t MemTotal done':>15s} {'t plugged done':>14s}  from")
    out.append(hdr)
    out.append("-" * len(hdr))
    for s in sc.steps:
        out.append(
            f"{s.name:12s} {mib(s.requested):>9s} {s.delta_mib:+10.1f}M {mib(s.plugged):>8s} "
            f"{(mib(s.usable) if s.usable >= 0 else '?'):>7s} "
            f"{s.allocated / MiB:9.1f}M {('yes' if s.allocated <= s.plugged else 'NO'):>10s} "
            f"{fmt_t(s.t_first_change):>16s} {fmt_t(s.t_memtotal):>15s} "
            f"{fmt_t(s.t_plugged):>14s}  {s.t_from}")
        for n in s.notes:
            out.append(f"{'':12s} note: {n}")
    out.append("")
    for k, v in sc.timings.items():
        out.append(f"  {k:40s} {v:7.2f} s")
    if sc.poweroff:
        out.append("poweroff:")
        for k, v in sc.poweroff.items():
            if isinstance(v, list):
                out.append(f"  {k}:")
                out.extend(f"    {x}" for x in v)
            elif k == "qemu.log":
                out.append(f"  qemu.log: {v!r}" if v else "  qemu.log: (empty)")
            else:
                out.append(f"  {k}: {v}")
    if sc.dmesg_virtio_mem:
        out.append("guest dmesg, virtio_mem lines:")
        out.extend(f"  {l}" for l in sc.dmesg_virtio_mem.splitlines())
    if sc.dmesg_bad:
        out.append("guest dmesg lines worth a look:")
        out.extend(f"  {l}" for l in sc.dmesg_bad)
    if trace_out is not None:
        out.append(f"trace: {trace_out} ({trace_n} messages)")
    out.append(f"workdir: {sc.workdir}")
    if sc.failures:
        out.append("FAILED:")
        out.extend(f"  - {f}" for f in sc.failures)
    else:
        out.append("OK")
    return "\n".join(out)


def trace_stats(path: Path) -> str:
    c = collections.Counter()
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if d.get("channel", "main") == "backend":
                name = "backend:" + {2: "CONFIG_CHANGE_MSG"}.get(d["request"], str(d["request"]))
            else:
                name = vu.request_name(d["request"])
            c[(name, d["dir"] == "frontend->backend")] += 1
    return ", ".join(f"{'->' if fe else '<-'} {n} ×{k}"
                     for (n, fe), k in sorted(c.items(), key=lambda x: -x[1]))


# --------------------------------------------------------------------------
# main: trio in the main thread (serve installs signal handlers)
# --------------------------------------------------------------------------


def make_workdir() -> Path:
    smoke.SHARE.mkdir(parents=True, exist_ok=True)
    d = smoke.SHARE / f"rec{os.getpid()}-{secrets.token_hex(3)}"
    d.mkdir()
    return d


async def run_vmemdev(args, workdir: Path) -> tuple[Scenario, bool]:
    sock = workdir / "vm0.sock"
    trace = workdir / "trace.jsonl"
    service = DeviceRuntime(Geometry(addr=REGION_ADDR, region_size=REGION_SIZE,
                                     block_size=BLOCK_SIZE), requested_size=args.steps[0] * MiB)
    dev = VmemdevDevice(service, sock, workdir / "hp0.mem")
    stop = threading.Event()
    shared: dict = {}
    sc = Scenario(args, dev, workdir, trace, stop, shared)
    interrupted = False
    error: list[BaseException] = []

    def thread_main():
        try:
            sc.run()
        except (CheckFailed, smoke.GuestError, Interrupted) as e:
            sc.fail(str(e))
        except BaseException as e:  # report, do not lose it in the thread
            error.append(e)

    async with trio.open_nursery() as nursery:
        async def serving(task_status=trio.TASK_STATUS_IGNORED):
            nonlocal interrupted
            await serve(service, socket_path=str(sock), trace_path=str(trace),
                        task_status=task_status)
            # serve returns only on SIGTERM/SIGINT
            interrupted = True
            stop.set()
            g = shared.get("guest")
            if g is not None and g.alive():
                g.proc.kill()

        await nursery.start(serving)
        say(f"vmemdev serving on {sock}, trace {trace}")
        try:
            await trio.to_thread.run_sync(thread_main)
        finally:
            stop.set()
            nursery.cancel_scope.cancel()
    if error:
        raise error[0]
    if interrupted:
        sc.fail("interrupted by a signal")
    return sc, interrupted


def run_builtin(args, workdir: Path) -> Scenario:
    dev = BuiltinDevice(workdir / "vm0.mem", args.steps[0] * MiB)
    sc = Scenario(args, dev, workdir, None, threading.Event(), {})
    try:
        sc.run()
    except (CheckFailed, smoke.GuestError) as e:
        sc.fail(str(e))
    return sc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"where to write the trace (default {DEFAULT_OUT.relative_to(REPO)})")
    ap.add_argument("--builtin", action="store_true",
                    help="run the same steps against QEMU's own virtio-mem-pci (no trace)")
    ap.add_argument("--step-timeout", type=float, default=120.0,
                    help="seconds each resize may take to show in the guest (default 120)")
    ap.add_argument("--ready-timeout", type=float, default=120.0,
                    help="seconds for the guest agent to come up (default 120)")
    ap.add_argument("--poweroff-timeout", type=float, default=30.0,
                    help="seconds QEMU may take to exit after poweroff -f (default 30)")
    ap.add_argument("--touch-mib", type=int, default=192,
                    help="MiB of guest tmpfs to fill at 512M (0: skip; default 192)")
    ap.add_argument("--steps", default=",".join(map(str, STEPS_MIB)),
                    type=lambda t: [int(x) for x in t.split(",")],
                    help="requested sizes in MiB, the first at start (default 256,512,128,0)")
    ap.add_argument("--nodefaults", action="store_true",
                    help="add -nodefaults (no default VGA/NIC; RAM becomes one memory region)")
    ap.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                    help="append ARG to QEMU's command line (repeatable; use --qemu-arg=-x)")
    ap.add_argument("--qemu-trace", action="store_true",
                    help="log QEMU trace events virtio_set_status, qemu_system_shutdown_request, "
                         "runstate_set (timestamped) to WORKDIR/qemu.log")
    ap.add_argument("--keep", action="store_true", help="keep the work directory on success")
    ap.add_argument("--log-level", default="info", help="vmemdev log level (to WORKDIR/vmemdev.log)")
    args = ap.parse_args()
    if args.qemu_trace:
        args.qemu_arg += ["-msg", "timestamp=on"]
        for ev in ("virtio_set_status", "qemu_system_shutdown_request", "runstate_set"):
            args.qemu_arg += ["-trace", ev]

    workdir = make_workdir()
    if args.builtin:
        sc = run_builtin(args, workdir)
        print(summary(sc, None, 0))
    else:
        handler = logging.FileHandler(workdir / "vmemdev.log")
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root = logging.getLogger("vmemdev")
        root.setLevel(getattr(logging, args.log_level.upper()))
        root.addHandler(handler)
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        err.setFormatter(logging.Formatter("[vmemdev] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(err)
        sc, _ = trio.run(run_vmemdev, args, workdir)
        trace = workdir / "trace.jsonl"
        n = sum(1 for _ in open(trace)) if trace.exists() else 0
        out = None
        if sc.steps_passed and n:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trace, args.out)
            out = args.out
        elif n:
            say(f"steps did not all pass: trace left in {trace}, {args.out} not written")
        print(summary(sc, out or (trace if n else None), n))
        if n:
            print("trace messages: " + trace_stats(trace))
        print(f"vmemdev log: {workdir / 'vmemdev.log'}")
    if sc.failures:
        print(f"(work directory kept: {workdir})")
        return 1
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
