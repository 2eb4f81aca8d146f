"""The end-to-end harness: `vmemdev serve` as a process, a real QEMU, a real guest.

A ``Lab`` is one test's world, all in one work directory under
/tmp/vmemdev-guestlab (the directory ``scripts/guestlab qemu`` shares with
QEMU's chroot):

- the device: either vmemdev, started exactly as the README tells a user
  (``.venv/bin/vmemdev serve --socket-path WORKDIR/vm0.sock --region-addr
  0x100000000 --region-size 1G --block-size 2M --requested-size ...``, its
  output in WORKDIR/vmemdev.log, driven through WORKDIR/vm0.ctl), or QEMU's
  built-in ``virtio-mem-pci`` (driven over QMP ``qom-set vmem0
  requested-size``), the reference;
- QEMU 11.1.3 under TCG with the documented command line
  (/work/shared/docs/real-guest-e2e.md), the device region a 1 GiB file in
  /dev/shm so its host allocation can be read (st_blocks);
- the guest (Linux 7.2 + busybox initramfs, tests/e2e/guest/init), driven
  through its serial agent (tests/e2e/guest/smoke.py).

Every wait is bounded; every failure names what was expected, what was seen,
and carries the tails of the guest console, vmemdev's log and QEMU's log.
Timings go to ``TIMINGS`` (printed side by side at the end of the session
and written to tests/e2e/last-timings.json by conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e" / "guest"))
import smoke  # noqa: E402  (tests/e2e/guest/smoke.py)

from vmemdev.client import Client  # noqa: E402
from vmemdev.errors import VmemdevError  # noqa: E402
from vmemdev.sizes import parse_size  # noqa: E402
from vmemdev.testing.processes import only_child  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
REGION_ADDR = 0x1_0000_0000
REGION_SIZE = 1 * GiB
BLOCK_SIZE = 2 * MiB
LINUX_MEMORY_BLOCK = 128 * MiB
TOL_KB = BLOCK_SIZE // KiB  # "MemTotal follows within a block"
SHM = Path("/dev/shm")

# Bounds (seconds). TCG on 2 cores: the agent is up ~5 s after QEMU starts,
# a resize shows in the guest within a few seconds.
READY_TIMEOUT = float(os.environ.get("VMEMDEV_E2E_READY_TIMEOUT", 120))
PROBE_TIMEOUT = 60.0
STEP_TIMEOUT = float(os.environ.get("VMEMDEV_E2E_STEP_TIMEOUT", 120))
POWEROFF_TIMEOUT = 30.0
DAEMON_START_TIMEOUT = 20.0
DAEMON_STOP_TIMEOUT = 20.0

# Guest kernel lines that fail any test: virtio_mem trouble, a broken device,
# kernel warnings/oopses.
VIRTIO_MEM_BAD = re.compile(r"virtio_mem.*(error|fail|broken|warn|bug|unexpected|invalid|"
                            r"refus|timeout|timed out)", re.I)
# (case-sensitive, as the kernel prints them: "loops_per_jiffy" is no Oops)
KERNEL_BAD = re.compile(r"marking device broken|\bBUG:|\bWARNING:|Call Trace|\bOops\b|"
                        r"Kernel panic|general protection fault|soft lockup|hung_task|"
                        r"page allocation failure|vmemmap alloc failure")
# Under `vmemdev hold`, a worker restart takes ~0.5 s (bench/results/restart.txt).
WORKER_RESTART_GRACE = 15.0
# Lines in the daemon's log that fail a test.
DAEMON_BAD = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")

# scenario -> metric -> device kind -> value (seconds unless the metric says)
TIMINGS: dict[str, dict[str, dict[str, float]]] = {}
# scenario -> device kind -> observable results (compared between devices)
OBSERVED: dict[str, dict[str, object]] = {}
NOTES: list[str] = []
# What the guest lab installed (scripts/guestlab info), for the report's meta.
LAB_VERSIONS: dict[str, str] = {}


def record(scenario: str, metric: str, kind: str, value: float) -> None:
    TIMINGS.setdefault(scenario, {}).setdefault(metric, {})[kind] = round(value, 3)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return out


def note(text: str) -> None:
    NOTES.append(text)


def vmemdev_bin() -> str:
    """The console script of the venv that runs the tests (.venv/bin/vmemdev),
    or $VMEMDEV_E2E_BIN (e.g. to try a patched build)."""
    if os.environ.get("VMEMDEV_E2E_BIN"):
        return os.environ["VMEMDEV_E2E_BIN"]
    here = Path(sys.executable).with_name("vmemdev")
    if here.exists():
        return str(here)
    fallback = REPO / ".venv" / "bin" / "vmemdev"
    if fallback.exists():
        return str(fallback)
    found = shutil.which("vmemdev")
    if found:
        return found
    raise RuntimeError("no vmemdev executable: run ./dev setup (it installs .venv/bin/vmemdev)")


def mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:.0f}M" if n % MiB == 0 else f"{n / MiB:.2f}M"


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def console_tail(path: Path, lines: int = 20) -> str:
    """The guest console without the agent's replies (@@BEGIN..@@END)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    keep, inside = [], False
    for line in text.splitlines():
        if line.startswith("@@BEGIN "):
            inside = True
        elif line.startswith("@@END "):
            inside = False
        elif not inside and line.strip():
            keep.append(line)
    return "\n".join(keep[-lines:]) or "(nothing but agent replies)"


def allocated(path: Path) -> int:
    """Bytes the host really holds for a file (st_blocks)."""
    return os.stat(path).st_blocks * 512


class E2EFailure(AssertionError):
    pass


# --------------------------------------------------------------------------
# vmemdev serve, as a process
# --------------------------------------------------------------------------


class Daemon:
    """``vmemdev serve`` started the README's way, with its control socket."""

    def __init__(self, workdir: Path, *, requested: str = "0", extra: tuple[str, ...] = (),
                 region: str = "1G", held: bool = False, env: dict[str, str] | None = None):
        """``held``: the README's way to survive the daemon's death, ``vmemdev
        hold -- vmemdev serve ... --state-file WORKDIR/vm0.state``; ``proc`` is
        then the holder and ``worker_pid()`` the serving process."""
        self.workdir = workdir
        self.sock = workdir / "vm0.sock"
        self.ctl_path = workdir / "vm0.ctl"  # the default: the socket's name with .ctl
        self.log_path = workdir / "vmemdev.log"
        self.state_path = workdir / "vm0.state" if held else None
        self.expected_exit = 0  # what SIGTERM at the end must give (a test may expect another)
        self.argv = [vmemdev_bin(), "serve", "--socket-path", str(self.sock),
                     "--region-addr", f"{REGION_ADDR:#x}", "--region-size", region,
                     "--block-size", "2M", "--requested-size", requested, *extra]
        if held:
            self.argv = [vmemdev_bin(), "hold", "--", *self.argv, "--state-file", str(self.state_path)]
        (workdir / "vmemdev.cmdline").write_text(shlex.join(self.argv) + "\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env=None if env is None else {**os.environ, **env})
        self._client: Client | None = None
        self.exit_status: int | None = None
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise E2EFailure(f"vmemdev serve exited with status {self.proc.returncode} at "
                                 f"start:\n{tail(self.log_path)}")
            if self.ctl_path.exists() and self.sock.exists():
                try:
                    self.execute("query-status")
                    break
                except VmemdevError:
                    pass
            if time.monotonic() > deadline:
                raise E2EFailure(f"vmemdev serve did not open {self.ctl_path} within "
                                 f"{DAEMON_START_TIMEOUT:.0f}s:\n{tail(self.log_path)}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def worker_pid(self, timeout: float = 10.0) -> int:
        """The serving process under ``vmemdev hold``."""
        deadline = time.monotonic() + timeout
        while (pid := only_child(self.proc.pid)) is None:
            if time.monotonic() > deadline or not self.alive():
                raise E2EFailure(f"vmemdev hold (pid {self.proc.pid}) has no worker:\n{tail(self.log_path)}")
            time.sleep(0.02)
        return pid

    def execute(self, command: str, **arguments):
        """One control command over a kept connection (reconnects once; under
        `hold`, for as long as a worker restart may take)."""
        deadline = time.monotonic() + (WORKER_RESTART_GRACE if self.state_path else 0)
        while True:
            try:
                return self._execute(command, **arguments)
            except (VmemdevError, OSError) as exc:
                if getattr(exc, "cls", None) or time.monotonic() > deadline or not self.alive():
                    raise
                time.sleep(0.02)

    def _execute(self, command: str, **arguments):
        for attempt in (1, 2):
            try:
                if self._client is None:
                    self._client = Client(str(self.ctl_path), timeout=10.0)
                result = self._client.execute(command, **arguments)
                self._client.pending_events.clear()
                return result
            except (VmemdevError, OSError) as exc:
                if getattr(exc, "cls", None):  # the daemon's answer: an error, not a lost link
                    raise
                if self._client is not None:
                    with contextlib.suppress(OSError):
                        self._client.close()
                    self._client = None
                if attempt == 2 or not self.alive():
                    raise
        raise AssertionError

    def ctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``vmemdev ctl --control-socket WORKDIR/vm0.ctl ARGS`` as a user types it."""
        argv = [vmemdev_bin(), "ctl", "--control-socket", str(self.ctl_path), *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise E2EFailure(f"{shlex.join(argv)} did not return within {timeout:.0f}s "
                             f"(stdout {exc.stdout!r})") from None

    def status(self) -> dict:
        return self.execute("query-status")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM; the documented exit is status 0 with the socket removed."""
        if self._client is not None:
            with contextlib.suppress(OSError):
                self._client.close()
            self._client = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self.exit_status = -9
                return self.exit_status
        self.exit_status = self.proc.returncode
        return self.exit_status


# --------------------------------------------------------------------------
# The two devices under test
# --------------------------------------------------------------------------


class VmemdevDevice:
    kind = "vmemdev"

    def __init__(self, lab: Lab, requested: int, daemon_args: tuple[str, ...], region: str = "1G",
                 held: bool = False, env: dict[str, str] | None = None):
        self.lab = lab
        self.region = region
        self.mem_path = lab.shm_file("hp0.mem")
        self.daemon = Daemon(lab.workdir, requested=str(requested), extra=daemon_args, region=region,
                             held=held, env=env)

    def qemu_args(self) -> list[str]:
        # The README's / the doc's lines for the device.
        return [
            "-object", f"memory-backend-file,id=hp0,size={self.region},share=on,mem-path={self.mem_path}",
            "-device", f"pc-dimm,id=dimm0,memdev=hp0,addr={REGION_ADDR:#x}",
            "-chardev", f"socket,id=c0,path={self.daemon.sock}",
            "-device", "vhost-user-test-device-pci,chardev=c0,virtio-id=24,num_vqs=1,"
                       "config_size=56",
        ]

    def resize(self, size: int) -> None:
        self.daemon.execute("resize", size=size)

    def sizes(self) -> tuple[int, int]:
        s = self.daemon.status()
        return s["plugged_size"], s["requested_size"]

    def check_invariants(self, where: str) -> dict:
        """query-accounting is one consistent snapshot: host allocation of the
        region <= plugged, nothing allocated outside plugged blocks."""
        acc = self.daemon.execute("query-accounting")
        problems = []
        if acc["host_allocated"] is None:
            problems.append("query-accounting has no host_allocated (region not shared?)")
        else:
            if acc["host_allocated"] > acc["plugged_size"]:
                problems.append(f"host_allocated {mib(acc['host_allocated'])} > plugged "
                                f"{mib(acc['plugged_size'])}")
            if acc["allocated_outside_plugged"]:
                problems.append(f"allocated_outside_plugged = "
                                f"{acc['allocated_outside_plugged']} bytes (must be 0)")
        if problems:
            self.lab.fail(f"{where}: " + "; ".join(problems))
        return acc

    def close(self) -> int:
        return self.daemon.stop()


class BuiltinDevice:
    """QEMU's own virtio-mem-pci (id vmem0): the reference."""

    kind = "qemu"
    PATH = "/machine/peripheral/vmem0"

    def __init__(self, lab: Lab, requested: int):
        self.lab = lab
        self.requested = requested
        self.mem_path = lab.shm_file("vm0.mem")
        self.daemon = None

    def qemu_args(self) -> list[str]:
        # The doc's replacement lines, with the region in a file so its host
        # allocation is measured as for vmemdev.
        return [
            "-object", f"memory-backend-file,id=vm0,size=1G,share=on,mem-path={self.mem_path}",
            "-device", f"virtio-mem-pci,id=vmem0,memdev=vm0,requested-size={self.requested},"
                       f"block-size=2M",
        ]

    def _get(self, prop: str) -> int:
        return int(self.lab.guest.qmp("qom-get", {"path": self.PATH, "property": prop}))

    def resize(self, size: int) -> None:
        self.lab.guest.qmp("qom-set", {"path": self.PATH, "property": "requested-size",
                                       "value": size})

    def sizes(self) -> tuple[int, int]:
        return self._get("size"), self._get("requested-size")

    def check_invariants(self, where: str) -> dict:
        plugged = self._get("size")
        alloc = allocated(self.mem_path)
        if alloc > plugged:
            self.lab.fail(f"{where}: the region file has {mib(alloc)} allocated, more than the "
                          f"{mib(plugged)} plugged")
        return {"plugged_size": plugged, "host_allocated": alloc}

    def close(self) -> int:
        return 0


# --------------------------------------------------------------------------
# A test's world
# --------------------------------------------------------------------------


class Lab:
    def __init__(self, info: dict, name: str):
        self.info = info
        self.name = name
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]
        self.workdir = smoke.SHARE / f"e2e-{os.getpid()}-{safe}-{secrets.token_hex(2)}"
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.shm_files: list[Path] = []
        self.device = None
        self.guest: smoke.Guest | None = None
        self.base_kb: int | None = None
        self.kind = "?"
        self.maxmem = "8G"
        self.kernel_args: tuple[str, ...] = ()
        self.boots = 0
        self._in_context = False
        self.daemon_log_allow: re.Pattern | None = None  # error lines a test caused on purpose

    # -- files ---------------------------------------------------------------
    def shm_file(self, name: str) -> Path:
        p = SHM / f"vmemdev-e2e-{self.workdir.name}-{name}"
        self.shm_files.append(p)
        return p

    def context(self) -> str:
        parts = [f"--- work directory: {self.workdir}"]
        if self.guest is not None:
            parts.append("--- guest console, agent replies left out (tail) ---\n"
                         + console_tail(self.guest.console_log, 20))
            if self.guest.alive() and not self._in_context:
                self._in_context = True
                try:  # bounded: the agent may be what is broken
                    st, out = self.guest.run("dmesg | tail -n 25", timeout=10)
                    parts.append("--- guest dmesg (tail) ---\n" + out.rstrip())
                except Exception as exc:
                    parts.append(f"--- guest dmesg: not available ({str(exc).splitlines()[0]})")
                finally:
                    self._in_context = False
            parts.append("--- qemu.log (tail) ---\n" + tail(self.guest.qemu_log, 10))
        if self.device is not None and self.device.daemon is not None:
            parts.append("--- vmemdev.log (tail) ---\n" + tail(self.device.daemon.log_path, 30))
        return "\n".join(parts)

    def fail(self, msg: str):
        raise E2EFailure(f"{msg}\n{self.context()}")

    # -- start -----------------------------------------------------------------
    def qemu_args(self, ram: str, reboot: bool) -> list[str]:
        """The documented command line (the serial console and QMP socket are
        added by smoke.boot; -display none stands for -nographic)."""
        info = self.info
        return [
            *info["accel_args"], "-smp", "2", "-display", "none",
            *([] if reboot else ["-no-reboot"]),
            "-m", f"{ram},maxmem={self.maxmem},slots=2",
            "-kernel", info["kernel"], "-initrd", info["initrd"],
            "-append", " ".join([info["kernel_cmdline"], *self.kernel_args]),
            "-object", f"memory-backend-memfd,id=ram,size={ram},share=on",
            "-machine", "memory-backend=ram",
            *self.device.qemu_args(),
        ]

    def start(self, kind: str = "vmemdev", *, ram: str = "512M", requested: int = 0,
              reboot: bool = False, daemon_args: tuple[str, ...] = (), scenario: str | None = None,
              qemu_cgroup: str | None = None, region: str = "1G", kernel_args: tuple[str, ...] = (),
              held: bool = False, daemon_env: dict[str, str] | None = None):
        """Start the device and boot the guest; wait for the driver to probe.
        With qemu_cgroup (a cgroup v1 directory) QEMU starts inside it.
        ``region``: the device region (vmemdev only; a sparse shm file).
        ``kernel_args``: appended to the lab's kernel command line (e.g.
        memhp_default_state=online: the lab's init then leaves the onlining
        to the command line; see online_settings).
        ``held``: vmemdev under `vmemdev hold` with a state file (Daemon)."""
        self.kind = kind
        self.kernel_args = tuple(kernel_args)
        self.qemu_cgroup = qemu_cgroup
        region_gib = -(-parse_size(region) // GiB)
        self.maxmem = f"{max(8, region_gib + 2)}G"
        if kind == "vmemdev":
            self.device = VmemdevDevice(self, requested, daemon_args, region, held=held, env=daemon_env)
        elif kind == "qemu":
            self.device = BuiltinDevice(self, requested)
        else:
            raise ValueError(kind)
        self.boot(ram=ram, reboot=reboot, scenario=scenario)
        return self

    def boot(self, *, ram: str = "512M", reboot: bool = False, scenario: str | None = None):
        self._ram, self._reboot = ram, reboot
        try:
            self.guest = smoke.boot(self.qemu_args(ram, reboot), workdir=self.workdir,
                                    ready_timeout=READY_TIMEOUT, qemu_cmd=self.qemu_cmd())
        except smoke.GuestError as exc:
            self.fail(f"the guest did not boot: {exc}")
        self.boots += 1
        self.guest.qmp("query-status")  # connect QMP while QEMU is healthy
        ready = self.guest.t_ready - self.guest.t_start
        self.wait_probe(scenario)
        if scenario:
            record(scenario, "boot: QEMU start -> agent ready", self.kind, ready)
        return self.guest

    def qemu_cmd(self) -> list[str] | None:
        """guestlab's QEMU, entering qemu_cgroup first (so QEMU and all it
        allocates are charged there)."""
        if not getattr(self, "qemu_cgroup", None):
            return None
        procs = os.path.join(self.qemu_cgroup, "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", procs,
                str(smoke.GUESTLAB), "qemu", "--"]

    def qemu_pid(self) -> int:
        """QEMU's own pid (guestlab runs it under a wrapper)."""
        for pid in _descendants(self.guest.proc.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                    return pid
        self.fail("no qemu-system process under the QEMU command")

    def boot_ram_allocated(self) -> int:
        """Host bytes behind the guest's boot RAM (QEMU's memory-backend-memfd)."""
        pid = self.qemu_pid()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:memory-backend-memfd"):
                    return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
        self.fail("QEMU holds no memory-backend-memfd")

    def wait_probe(self, scenario: str | None = None, since_line: int = 0) -> str:
        """Wait until the driver printed its probe lines; set base_kb."""
        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            st, out = self.run("dmesg | grep virtio_mem")
            lines = out.splitlines()[since_line:]
            if any("requested size" in l for l in lines):
                break
            if time.monotonic() > deadline:
                self.fail(f"the virtio_mem driver did not probe within {PROBE_TIMEOUT:.0f}s of the "
                          f"agent coming up; dmesg virtio_mem lines: {out!r}")
            time.sleep(0.2)
        self.probe_seen = time.monotonic() - self.guest.t_start
        m = re.search(r"^\[\s*([\d.]+)\] virtio_mem virtio\d+: start address", "\n".join(lines),
                      re.M)
        if m and scenario:
            record(scenario, "boot: guest uptime at virtio_mem probe", self.kind, float(m.group(1)))
        before = self.check("cat /run/guestlab/meminfo.before-modules")
        self.base_kb = int(re.search(r"^MemTotal:\s+(\d+)", before, re.M).group(1))
        return out

    # -- guest access ------------------------------------------------------
    def run(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        try:
            return self.guest.run(cmd, timeout=timeout)
        except smoke.GuestError as exc:
            self.fail(f"guest command {cmd[:120]!r}: {exc}")

    def check(self, cmd: str, timeout: float = 60.0) -> str:
        st, out = self.run(cmd, timeout)
        if st != 0:
            self.fail(f"guest command failed with status {st}: {cmd[:200]!r}\n{out[-2000:]}")
        return out

    def meminfo(self) -> dict[str, int]:
        out = self.check("cat /proc/meminfo")
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+):\s+(\d+)", out, re.M)}

    def vmstat(self) -> dict[str, int]:
        out = self.check("cat /proc/vmstat")
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+) (\d+)$", out, re.M)}

    def online_settings(self) -> dict[str, str]:
        """How the guest onlines hot-added memory, read in the guest: sysfs's
        auto_online_blocks and memory_hotplug's online_policy now, and what
        the lab's init did about it."""
        out = self.check("cat /sys/devices/system/memory/auto_online_blocks; "
                         "cat /sys/module/memory_hotplug/parameters/online_policy 2>/dev/null || echo -; "
                         "grep -E 'auto_online_blocks|online_policy' /run/guestlab/init.log")
        aob, policy, *init = out.strip().splitlines()
        return {"auto_online_blocks": aob.strip(), "online_policy": policy.strip(), "init": "; ".join(init)}

    def memtotal(self) -> int:
        return self.meminfo()["MemTotal"]

    def dmesg(self) -> str:
        return self.check("dmesg", timeout=120)

    # -- checks ------------------------------------------------------------
    def check_guest_clean(self, where: str, allow: re.Pattern | None = None) -> list[str]:
        """Scenario (h): no virtio_mem error, no "marking device broken", no
        kernel warning. Lines matching `allow` are returned instead."""
        dm = self.dmesg()
        (self.workdir / f"guest-dmesg-{self.boots}.txt").write_text(dm)
        bad, allowed = [], []
        for line in dm.splitlines():
            if VIRTIO_MEM_BAD.search(line) or KERNEL_BAD.search(line):
                (allowed if allow is not None and allow.search(line) else bad).append(line)
        if bad:
            self.fail(f"{where}: the guest logged virtio_mem errors or kernel warnings:\n    "
                      + "\n    ".join(bad[:40]))
        return allowed

    def check_daemon_clean(self, where: str) -> None:
        if self.device is None or self.device.daemon is None:
            return
        allow = self.daemon_log_allow
        bad = [l for l in self.device.daemon.log_text().splitlines()
               if DAEMON_BAD.search(l) and not (allow is not None and allow.search(l))]
        if bad:
            self.fail(f"{where}: vmemdev logged errors:\n    " + "\n    ".join(bad[:30]))

    def check_step(self, where: str, target: int) -> dict:
        """After a step settled: MemTotal = base + plugged (within a block),
        plugged = requested = target, host allocation <= plugged."""
        plugged, requested = self.device.sizes()
        total = self.memtotal()
        alloc = allocated(self.device.mem_path)
        acc = self.device.check_invariants(where)
        problems = []
        if plugged != target or requested != target:
            problems.append(f"device plugged {mib(plugged)} requested {mib(requested)}, "
                            f"expected both {mib(target)}")
        if abs(total - (self.base_kb + plugged // KiB)) > TOL_KB:
            problems.append(f"MemTotal {total} kB is not base {self.base_kb} kB + plugged "
                            f"{plugged // KiB} kB (± {TOL_KB} kB)")
        if alloc > plugged:
            problems.append(f"the region file {self.device.mem_path} has {mib(alloc)} allocated "
                            f"(st_blocks), more than the {mib(plugged)} plugged")
        if problems:
            self.fail(f"{where}: " + "; ".join(problems))
        return {"target": target, "plugged": plugged, "memtotal_kb": total,
                "memtotal_delta_kb": total - self.base_kb, "file_allocated": alloc,
                "host_allocated": acc.get("host_allocated")}

    def wait_target(self, target: int, *, t0: float, where: str, timeout: float = STEP_TIMEOUT,
                    before_kb: int | None = None, poll: float = 0.05,
                    requested: int | None = None, every_poll: bool = True) -> dict:
        """Poll the guest's MemTotal and the device until plugged == requested
        == target and MemTotal == base + target (within a block). Returns the
        times from t0: first MemTotal change, MemTotal reached, plugged reached.
        Checks the device's invariants at every poll (``every_poll=False``:
        at the end only; with --prealloc a PLUG's blocks are allocated before
        they count as plugged)."""
        want_kb = self.base_kb + target // KiB
        want_requested = target if requested is None else requested
        deadline = t0 + timeout
        t_first = t_mem = t_plug = None
        while True:
            if not self.guest.alive():
                self.fail(f"{where}: QEMU exited (status {self.guest.proc.poll()}) while waiting "
                          f"for {mib(target)}")
            total = self.memtotal()
            now = time.monotonic()
            if t_first is None and before_kb is not None and total != before_kb:
                t_first = now - t0
            mem_ok = abs(total - want_kb) <= TOL_KB
            if t_mem is None and mem_ok:
                t_mem = now - t0
            plugged, now_requested = self.device.sizes()
            if t_plug is None and plugged == target:
                t_plug = time.monotonic() - t0
            if every_poll:
                self.device.check_invariants(f"{where} (while waiting)")
            if mem_ok and plugged == target and now_requested == want_requested:
                break
            if time.monotonic() > deadline:
                self.fail(f"{where}: within {timeout:.0f}s the guest did not get to {mib(target)}: "
                          f"MemTotal {total} kB (base {self.base_kb} kB, want {want_kb} kB ± "
                          f"{TOL_KB}; delta {(total - self.base_kb) / 1024:+.1f} MiB), device "
                          f"plugged {mib(plugged)} requested {mib(now_requested)}")
            time.sleep(poll)
        return {"first_change": t_first, "memtotal": t_mem, "plugged": t_plug}

    def resize_and_wait(self, target: int, *, scenario: str, label: str,
                        timeout: float = STEP_TIMEOUT, record_it: bool = True) -> dict:
        before_kb = self.memtotal()
        t0 = time.monotonic()
        self.device.resize(target)
        t = self.wait_target(target, t0=t0, where=f"{label}", timeout=timeout,
                             before_kb=before_kb)
        if record_it:
            record(scenario, f"{label}: resize -> plugged reached", self.kind, t["plugged"])
            record(scenario, f"{label}: resize -> MemTotal reached", self.kind, t["memtotal"])
        return t

    # -- the end -----------------------------------------------------------
    def poweroff(self, timeout: float = POWEROFF_TIMEOUT) -> tuple[int, float]:
        t = time.monotonic()
        try:
            rc = self.guest.poweroff(timeout=timeout)
        except smoke.GuestError as exc:
            self.fail(f"poweroff: {exc}")
        return rc, time.monotonic() - t

    def close(self, keep: bool) -> list[str]:
        """Stop QEMU and the daemon; remove the region files; remove the work
        directory unless keep. Returns problems found while stopping."""
        problems = []
        if self.guest is not None:
            with contextlib.suppress(Exception):
                self.guest.close()
        if self.device is not None:
            rc = self.device.close()
            if self.device.daemon is not None:
                expected = self.device.daemon.expected_exit
                if rc != expected:
                    problems.append(f"vmemdev serve exited with status {rc} on SIGTERM "
                                    f"(expected {expected}):\n{tail(self.device.daemon.log_path)}")
                elif expected == 0 and self.device.daemon.sock.exists():
                    problems.append(f"vmemdev serve left its socket {self.device.daemon.sock}")
        for p in self.shm_files:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if not keep and not problems:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems


def guestlab_info() -> dict:
    return smoke.guestlab_info()


def write_timings(path: Path, meta: dict) -> None:
    data = {"meta": meta, "timings": TIMINGS, "observed": OBSERVED, "notes": NOTES}
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def timings_table() -> str:
    kinds = ["vmemdev", "qemu"]
    rows = []
    w = max([len(m) for s in TIMINGS.values() for m in s] + [20]) + 2
    head = f"{'scenario / metric':<{w}} {'vmemdev':>10} {'qemu virtio-mem-pci':>20}"
    rows.append(head)
    rows.append("-" * len(head))
    for scenario, metrics in TIMINGS.items():
        rows.append(scenario)
        for metric, vals in metrics.items():
            cells = []
            for k in kinds:
                v = vals.get(k)
                cells.append("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
            rows.append(f"  {metric:<{w - 2}} {cells[0]:>10} {cells[1]:>20}")
    return "\n".join(rows)
