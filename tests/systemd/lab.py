"""A real systemd 252 as PID 1 of a systemd-nspawn container booted from the
scripts/systemdlab cache, running the shipped units.

The container shares two directories with the host: ``run`` is its
/run/vmemdev (the units' socket, control socket and state file, so a
front-end and `vmemdev ctl` on the host reach them) and ``etc`` its
/etc/vmemdev (the per-VM options). Its root file system is the cache's, never
written (--volatile=overlay). Commands run inside it with nsenter.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmemdev.testing.processes import only_child

REPO = Path(__file__).resolve().parents[2]
SYSTEMDLAB = REPO / "scripts" / "systemdlab"
VMEMDEV = [sys.executable, "-m", "vmemdev"]
PATH = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def lab_info() -> dict:
    """`scripts/systemdlab info`; raises RuntimeError saying what is wrong."""
    result = subprocess.run([sys.executable, str(SYSTEMDLAB), "info"], capture_output=True, text=True, timeout=60)
    try:
        info = json.loads(result.stdout)
    except ValueError:
        raise RuntimeError(f"scripts/systemdlab info failed: {result.stderr.strip()}") from None
    if not info.get("provisioned"):
        raise RuntimeError(f"not provisioned at {info.get('root')}")
    return info


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class Container:
    def __init__(self, info: dict, workdir: Path, name: str = "vmemdev-systemdlab"):
        self.info = info
        self.name = name
        self.workdir = workdir
        self.run_dir = workdir / "run"  # /run/vmemdev inside
        self.etc_dir = workdir / "etc"  # /etc/vmemdev inside
        self.log_path = workdir / "nspawn.log"
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None  # the container's PID 1 (systemd), in our pid namespace
        self._lock: int | None = None
        self.boot_seconds: float | None = None
        self._cursor: str | None = None

    # --- life ---------------------------------------------------------------

    def boot(self, timeout: float = 90) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        # While we run from the cache, provision does not change it.
        self._lock = os.open(self.info["rootfs_lock"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", self.info["rootfs"], "--boot", "--register=no", "--keep-unit",
                 "--volatile=overlay",
                 # Its own network namespace, and so CAP_NET_ADMIN, which nspawn otherwise
                 # drops: PrivateNetwork= brings up "lo" in the service's namespace with it.
                 "--private-network",
                 f"--machine={self.name}", f"--bind={self.run_dir}:/run/vmemdev",
                 f"--bind-ro={self.etc_dir}:/etc/vmemdev"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.leader = wait_until(lambda: self._alive() and self._init(), 30, "the container's PID 1 to appear")
            state = wait_until(lambda: self._system_state(), timeout, "systemd to finish booting", interval=0.2)
            if state != "running":
                failed = self.sh("systemctl", "--failed", "--no-legend", check=False).stdout
                raise RuntimeError(f"the container's systemd is {state!r}; failed units:\n{failed}")
            self.boot_seconds = time.monotonic() - started
        except BaseException:
            self.poweroff()
            raise

    def _init(self) -> int | None:
        """nspawn's child once it is PID 1 of the container (nspawn forks an
        intermediate child first, which exits)."""
        pid = only_child(self.proc.pid)
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            return None
        return pid if len(nspid) == 2 and nspid[1] == "1" else None

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with status {self.proc.returncode}: "
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")
        return True

    def _system_state(self) -> str | None:
        self._alive()
        state = self.sh("systemctl", "is-system-running", check=False).stdout.strip()
        # "offline": its PID 1 does not answer yet
        return None if state in ("initializing", "starting", "offline", "") else state

    def poweroff(self, timeout: float = 30) -> None:
        """Power the container off; kill our nspawn (by its pid) only if it does not end."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.leader is not None:
                    self.sh("systemctl", "poweroff", "--no-block", check=False)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container to stop
                    try:
                        self.proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

    # --- commands inside ------------------------------------------------------

    def sh(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}",
                                 "LANG=C.UTF-8", *argv], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode} in the container:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        return self.sh("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        """The unit's journal since the last reset()."""
        after = [f"--after-cursor={self._cursor}"] if self._cursor else []
        return self.sh("journalctl", "--no-pager", "-o", "cat", "-u", unit, *after, check=False).stdout

    # --- vmemdev's units ------------------------------------------------------

    def ctl(self, vm: str, *args: str, timeout: float = 90) -> dict:
        """`vmemdev ctl --json ...` from the host, on the bound control socket."""
        result = subprocess.run(VMEMDEV + ["ctl", "--control-socket", str(self.run_dir / f"{vm}.ctl"), "--json",
                                           *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"vmemdev ctl {' '.join(args)}: {result.stdout}{result.stderr}")
        return json.loads(result.stdout)

    def reset(self, vm: str) -> None:
        """Nothing of a previous test left: units stopped, no failure recorded, files gone."""
        self.systemctl("stop", f"vmemdev@{vm}.service", f"vmemdev@{vm}.socket", check=False)
        self.systemctl("reset-failed", check=False)
        for path in self.run_dir.iterdir():
            path.unlink()
        out = self.sh("journalctl", "--no-pager", "-n", "0", "--show-cursor", check=False).stdout
        self._cursor = next((l.split("cursor: ", 1)[1].strip() for l in out.splitlines() if "cursor: " in l), None)
