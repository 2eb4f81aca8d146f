"""Shared machinery: statistics, the daemon as a process, the C helper, host facts."""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BLOCK = 2 * MiB
HERE = Path(__file__).resolve().parent


class BenchError(Exception):
    """A benchmark could not run (as opposed to a target being missed)."""


# --- statistics -------------------------------------------------------------


def pct(samples, p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    s = sorted(samples)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def lat_summary(ns_samples) -> dict:
    """p50/p90/p99/max in microseconds from nanosecond samples."""
    us = [x / 1000 for x in ns_samples]
    return {"n": len(us), "p50_us": pct(us, 50), "p90_us": pct(us, 90), "p99_us": pct(us, 99),
            "max_us": max(us) if us else float("nan")}


# --- host facts ---------------------------------------------------------------


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            out[key] = int(rest.split()[0]) * 1024
    return out


def mem_available() -> int:
    return meminfo()["MemAvailable"]


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def uptime_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in loadavg())


def proc_status(pid: int) -> dict:
    """Memory and fd facts of a process, from /proc."""
    info: dict = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmPTE", "VmSize", "VmHWM"):
                info[key] = int(rest.split()[0]) * 1024
            elif key == "Threads":
                info[key] = int(rest)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    info["Pss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    info["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return info


def host_meta() -> dict:
    u = os.uname()
    rev = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vmemdev", "native"], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if rev and dirty:
            rev += " (vmemdev/ or native/ modified)"
    except (OSError, subprocess.SubprocessError):
        pass
    m = meminfo()
    return {
        "kernel": f"{u.sysname} {u.release}", "machine": u.machine, "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "mem_total": m["MemTotal"], "mem_available": m["MemAvailable"],
        "swap_total": m.get("SwapTotal", 0), "git": rev,
    }


# --- the C helper -------------------------------------------------------------


class Helper:
    """bench/helper.c, compiled now with cc into a temporary directory."""

    def __init__(self):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise BenchError("no C compiler (cc): the raw baselines are C; install gcc")
        self._dir = tempfile.TemporaryDirectory(prefix="vmemdev-bench-")
        self.path = os.path.join(self._dir.name, "helper.so")
        cmd = [cc, "-O2", "-shared", "-fPIC", "-o", self.path, str(HERE / "helper.c"), "-lpthread"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise BenchError(f"compiling the C helper failed: {' '.join(cmd)}\n{r.stderr}")
        lib = ctypes.CDLL(self.path)  # ctypes releases the GIL around calls
        for name in ("bh_punch", "bh_fallocate"):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
            fn.restype = ctypes.c_int64
        lib.bh_populate.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
        lib.bh_populate.restype = ctypes.c_int64
        self.lib = lib

    @staticmethod
    def _check(what: str, rc: int) -> int:
        if rc < 0:
            raise BenchError(f"{what}: {os.strerror(-rc)}")
        return rc

    def punch(self, fd: int, offset: int, length: int, chunk: int = 0) -> int:
        """ns to punch [offset, offset+length) in `chunk`-byte calls (0: one call)."""
        return self._check("punch", self.lib.bh_punch(fd, offset, length, chunk))

    def fallocate(self, fd: int, offset: int, length: int, chunk: int = 0) -> int:
        return self._check("fallocate", self.lib.bh_fallocate(fd, offset, length, chunk))

    def populate(self, addr: int, length: int, threads: int = 1) -> int:
        return self._check("populate", self.lib.bh_populate(addr, length, threads))

    def close(self) -> None:
        self._dir.cleanup()


def populate_checked(helper: Helper, addr: int, length: int, threads: int = 2,
                     chunk: int = GiB, reserve: int = GiB) -> None:
    """Populate in chunks, refusing to take the machine below `reserve` available bytes."""
    pos = 0
    while pos < length:
        n = min(chunk, length - pos)
        avail = mem_available()
        if avail - n < reserve:
            raise BenchError(f"populating would leave {(avail - n) / GiB:.1f} GiB available "
                             f"(reserve {reserve / GiB:.0f} GiB): another process is using memory")
        helper.populate(addr + pos, n, threads)
        pos += n


# --- the daemon as a process ---------------------------------------------------


@dataclass
class Daemon:
    """`python -m vmemdev serve` as its own process, with its control socket."""

    region_size: int = GiB
    requested_size: int = 0
    extra: tuple[str, ...] = ()
    block_size: int = BLOCK
    region_addr: int = 0x1_0000_0000
    # How to start the daemon; VMEMDEV_BENCH_DAEMON points it at a patched copy.
    command: tuple[str, ...] = field(default_factory=lambda: daemon_command())
    startup_s: float = field(init=False, default=float("nan"))

    def __post_init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="vmemdev-bench-")
        self.socket_path = os.path.join(self._dir.name, "vm0.sock")
        self.control_path = os.path.join(self._dir.name, "vm0.ctl")
        self.log_path = os.path.join(self._dir.name, "daemon.log")
        self._log = open(self.log_path, "w")
        cmd = [*self.command, "serve", "--socket-path", self.socket_path,
               "--control-socket", self.control_path, "--region-addr", hex(self.region_addr),
               "--region-size", str(self.region_size), "--block-size", str(self.block_size),
               "--requested-size", str(self.requested_size), "--log-level", "warning",
               *NOT_A_LINUX_GUEST, *self.extra, *serve_args(self._dir.name)]
        t0 = time.perf_counter()
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        self.pid = self.process.pid
        try:
            self.startup_s = wait_control_ready(self.control_path, self.process, t0)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def status(self) -> dict:
        return proc_status(self.pid)

    def control(self, command: str, **args):
        from vmemdev.client import Client

        with Client(self.control_path) as c:
            return c.execute(command, **args)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.returncode not in (0, -15):
            tail = self.log()[-2000:]
            self._log.close()
            self._dir.cleanup()
            raise BenchError(f"vmemdev serve exited with {self.process.returncode}: {tail}")
        self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# The bench's front-end plugs blocks without writing them and has 64 MiB of
# boot RAM: the memmap observer would take it for a Linux guest that onlines
# movable with no kernel memory to spare and cap it. Those policies are for
# Linux guests (tests/test_memmap.py, the e2e tier), not for this.
NOT_A_LINUX_GUEST = ("--memmap-observe", "off")


def serve_args(directory: str) -> list[str]:
    """$VMEMDEV_BENCH_SERVE_ARGS, added to every daemon's `serve` ("{dir}": its
    temporary directory), e.g. "--state-file {dir}/vm0.state" to measure durability."""
    return [a.replace("{dir}", directory) for a in shlex.split(os.environ.get("VMEMDEV_BENCH_SERVE_ARGS", ""))]


def daemon_command() -> tuple[str, ...]:
    """`python -m vmemdev`, or $VMEMDEV_BENCH_DAEMON (e.g. "/tmp/copy/.venv/bin/python -P -m vmemdev")."""
    env = os.environ.get("VMEMDEV_BENCH_DAEMON")
    return tuple(shlex.split(env)) if env else (sys.executable, "-m", "vmemdev")


def wait_control_ready(path: str, process: subprocess.Popen, t0: float, timeout: float = 30.0) -> float:
    """Seconds from t0 until the control socket answers with its greeting."""
    deadline = t0 + timeout
    while True:
        if process.poll() is not None:
            raise BenchError(f"vmemdev serve exited with {process.returncode} during start-up")
        if time.perf_counter() > deadline:
            raise BenchError("vmemdev serve: control socket not ready after 30 s")
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
                line = s.makefile("rb").readline()
            finally:
                s.close()
            if b'"vmemdev"' in line:
                return time.perf_counter() - t0
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        time.sleep(0.001)


def spawn_echo(kind: str, pass_fds: tuple[int, ...], *args: str) -> subprocess.Popen:
    """The far side of a ping-pong baseline, as its own process (bench/echo.py)."""
    return subprocess.Popen([sys.executable, "-m", "bench.echo", kind, *args], pass_fds=pass_fds,
                            cwd=str(HERE.parent), stdin=subprocess.DEVNULL)


def stop_process(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
