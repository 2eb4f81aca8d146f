#!/usr/bin/env python3
"""Boot the guestlab guest under QEMU and drive it (stdlib only).

Library use (for the e2e harness)::

    from smoke import boot, guestlab_info, builtin_virtio_mem_args
    info = guestlab_info()
    with boot(builtin_virtio_mem_args(info)) as g:   # waits for the agent
        status, out = g.run("ls /sys/devices/system/memory")
        g.meminfo()["MemTotal"]                       # kB
        g.dmesg()
        g.qmp("qom-set", {"path": "/machine/peripheral/vmem0",
                          "property": "requested-size", "value": 512 << 20})
        g.poweroff(timeout=30)                        # QEMU's exit status

boot() adds to the given QEMU arguments: the serial console (a unix socket
that this module listens on, QEMU connects to it at start, so nothing the
guest prints is lost) and a QMP socket, both in a fresh work directory under
/tmp/vmemdev-guestlab (which "guestlab qemu" shares with QEMU's chroot). Do
not pass -serial, -qmp, -nographic or -monitor yourself. Everything the guest
printed is in <workdir>/console.log, QEMU's own stdout/stderr in
<workdir>/qemu.log. Every wait is bounded; errors raise GuestError with the
tail of both logs.

Command line: python3 tests/e2e/guest/smoke.py --builtin
  boots the guest with QEMU's built-in virtio-mem-pci (requested 256M, block
  2M), checks the driver probed and MemTotal rose by 256 MiB, resizes to 512M
  over QMP and to 128M, checks MemTotal follows, powers off and checks QEMU
  exits; prints timings. Needs root and a provisioned guestlab.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
GUESTLAB = REPO / "scripts" / "guestlab"
SHARE = Path("/tmp/vmemdev-guestlab")
MiB = 1 << 20


class GuestError(Exception):
    pass


class GuestTimeout(GuestError):
    pass


def guestlab_info(guestlab: Path | str = GUESTLAB) -> dict:
    r = subprocess.run([str(guestlab), "info"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise GuestError(f"guestlab is not provisioned (run {guestlab} provision):\n"
                         f"{r.stdout}{r.stderr}")
    return json.loads(r.stdout)


def builtin_virtio_mem_args(info: dict, *, ram="512M", maxmem="8G", region="1G",
                            requested="256M", block="2M", smp=2) -> list[str]:
    """QEMU args for the guest with QEMU's own virtio-mem-pci (id vmem0)."""
    return [
        *info["accel_args"], "-smp", str(smp), "-nodefaults", "-display", "none",
        "-no-reboot", "-m", f"{ram},maxmem={maxmem},slots=2",
        "-kernel", info["kernel"], "-initrd", info["initrd"], "-append", info["kernel_cmdline"],
        "-object", f"memory-backend-memfd,id=ram,size={ram},share=on",
        "-machine", "memory-backend=ram",
        "-object", f"memory-backend-memfd,id=vm0,size={region},share=on",
        "-device", f"virtio-mem-pci,id=vmem0,memdev=vm0,requested-size={requested},"
                   f"block-size={block}",
    ]


class _Serial:
    """Reads the guest's console into lines (thread), logs it to a file."""

    def __init__(self, conn: socket.socket, logpath: Path):
        self.conn = conn
        self.log = open(logpath, "ab", buffering=0)
        self.lines: list[str] = []
        self.partial = b""
        self.cond = threading.Condition()
        self.closed = False
        self.first_byte_at: float | None = None
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        try:
            while True:
                data = self.conn.recv(65536)
                if not data:
                    break
                if self.first_byte_at is None:
                    self.first_byte_at = time.monotonic()
                self.log.write(data)
                with self.cond:
                    buf = self.partial + data
                    *done, self.partial = buf.split(b"\n")
                    self.lines.extend(l.decode("utf-8", "replace") for l in done)
                    self.cond.notify_all()
        except OSError:
            pass
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def send(self, line: str):
        self.conn.sendall(line.encode() + b"\n")

    def wait_line(self, pred, start: int, deadline: float, alive) -> int:
        """Index of the first line >= start for which pred(line) holds."""
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    if pred(self.lines[i]):
                        return i
                    i += 1
                if self.closed:
                    raise GuestError("the serial console closed (QEMU exited?)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout("timed out waiting on the serial console")
                if not alive():
                    raise GuestError("QEMU exited")
                self.cond.wait(min(left, 0.5))

    def close(self):
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.thread.join(5)
        self.log.close()


class _QMP:
    def __init__(self, path: Path, deadline: float, alive):
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise GuestTimeout(f"QMP socket {path} never accepted a connection") from None
                if not alive():
                    raise GuestError("QEMU exited before its QMP socket was up") from None
                time.sleep(0.05)
        self.sock = s
        self.f = s.makefile("rb")
        self.events: list[dict] = []
        self.n = 0
        s.settimeout(max(1.0, deadline - time.monotonic()))
        greeting = self._read()
        if "QMP" not in greeting:
            raise GuestError(f"unexpected QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.f.readline()
        if not line:
            raise GuestError("QMP connection closed")
        return json.loads(line)

    def execute(self, cmd: str, args: dict | None = None, timeout: float = 30.0):
        self.n += 1
        ident = f"guestlab-{self.n}"
        msg = {"execute": cmd, "id": ident}
        if args:
            msg["arguments"] = args
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            deadline = time.monotonic() + timeout
            while True:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                r = self._read()
                if "event" in r:
                    self.events.append(r)
                    continue
                if r.get("id") != ident:
                    continue
                if "error" in r:
                    raise GuestError(f"QMP {cmd} {args or ''}: {r['error'].get('class')}: "
                                     f"{r['error'].get('desc')}")
                return r.get("return")
        except TimeoutError:
            raise GuestTimeout(f"QMP {cmd}: no answer within {timeout}s") from None

    def close(self):
        with contextlib.suppress(OSError):
            self.f.close()
            self.sock.close()


class Guest:
    """A running guest. Use boot() to make one; use it as a context manager
    (or call close()) so QEMU is killed and sockets are closed."""

    def __init__(self, proc, workdir: Path, serial: _Serial, t_start: float,
                 keep_workdir: bool = True):
        self.proc = proc
        self.keep_workdir = keep_workdir
        self.workdir = workdir
        self.serial = serial
        self.t_start = t_start          # time.monotonic() when QEMU was started
        self.t_ready: float | None = None
        self.ready_line: str | None = None
        self._qmp: _QMP | None = None
        self._pos = 0                   # console lines consumed so far
        self.console_log = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"

    # -- helpers ---------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _fail(self, e: Exception, what: str):
        tail_c = "\n".join(self.serial.lines[-15:])
        tail_q = "(unreadable)"
        with contextlib.suppress(OSError):
            tail_q = self.qemu_log.read_text(errors="replace")[-2000:]
        raise type(e)(f"{what}: {e}\n--- console (last lines) ---\n{tail_c}\n"
                      f"--- qemu.log ---\n{tail_q}\n--- in {self.workdir}") from None

    def wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        try:
            i = self.serial.wait_line(lambda l: l.startswith("@@READY "), self._pos, deadline,
                                      self.alive)
        except GuestError as e:
            self._fail(e, f"the guest agent did not come up within {timeout}s")
        self.t_ready = time.monotonic()
        self.ready_line = self.serial.lines[i]
        self._pos = i + 1

    # -- the API ---------------------------------------------------------
    def request(self, verb: str, arg: str = "", timeout: float = 60.0) -> tuple[int, str]:
        ident = secrets.token_hex(4)
        begin, end_re = f"@@BEGIN {ident}", re.compile(rf"^@@END {ident} (\d+)$")
        deadline = time.monotonic() + timeout
        try:
            self.serial.send(f"{verb} {ident} {arg}".rstrip())
            b = self.serial.wait_line(lambda l: l == begin or l.startswith(f"@@ERROR {ident}"),
                                      self._pos, deadline, self.alive)
            if self.serial.lines[b] != begin:
                raise GuestError(self.serial.lines[b])
            e = self.serial.wait_line(lambda l: bool(end_re.match(l)), b + 1, deadline,
                                      self.alive)
        except GuestError as ex:
            self._fail(ex, f"{verb} {arg[:200]!r}")
        status = int(end_re.match(self.serial.lines[e]).group(1))
        body = self.serial.lines[b + 1:e]
        self._pos = e + 1
        return status, "\n".join(body)

    def run(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run a shell command in the guest: (exit status, stdout+stderr)."""
        if "\n" in cmd or "\r" in cmd:
            return self.request("B64", base64.b64encode(cmd.encode()).decode(), timeout)
        return self.request("RUN", cmd, timeout)

    def check(self, cmd: str, timeout: float = 60.0) -> str:
        status, out = self.run(cmd, timeout)
        if status != 0:
            raise GuestError(f"guest command failed ({status}): {cmd}\n{out}")
        return out

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo as {name: kB} (HugePages_* counts as plain ints)."""
        out = self.check("cat /proc/meminfo")
        return {m.group(1): int(m.group(2))
                for m in re.finditer(r"^(\S+):\s+(\d+)", out, re.M)}

    def dmesg(self) -> str:
        return self.check("dmesg")

    def qmp(self, cmd: str, args: dict | None = None, timeout: float = 30.0):
        if self._qmp is None:
            self._qmp = _QMP(self.workdir / "qmp.sock", time.monotonic() + timeout, self.alive)
        return self._qmp.execute(cmd, args, timeout)

    def poweroff(self, timeout: float = 30.0) -> int:
        """Power the guest off; return QEMU's exit status. GuestTimeout if
        QEMU is still running after `timeout` s (it is left running so the
        caller can look at it; close() kills it)."""
        t = time.monotonic()
        self.request("POWEROFF", "", timeout=min(timeout, 30.0))
        try:
            rc = self.proc.wait(timeout=max(0.1, timeout - (time.monotonic() - t)))
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"QEMU did not exit within {timeout}s of the guest's "
                               f"poweroff -f") from None
        return rc

    def close(self):
        if self._qmp:
            self._qmp.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.serial.close()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def boot(qemu_args: list[str], *, qemu_cmd: list[str] | None = None,
         workdir: Path | None = None, ready_timeout: float = 120.0,
         keep_workdir: bool = True) -> Guest:
    """Start QEMU with qemu_args (+ serial and QMP), wait for the guest
    agent's ready marker, return a Guest. qemu_cmd defaults to
    [scripts/guestlab, "qemu", "--"]; workdir (sockets and logs) must be
    visible to QEMU, i.e. under /tmp/vmemdev-guestlab or a --share dir;
    keep_workdir=False removes it on close()."""
    if qemu_cmd is None:
        qemu_cmd = [str(GUESTLAB), "qemu", "--"]
    SHARE.mkdir(parents=True, exist_ok=True)
    if workdir is None:
        workdir = SHARE / f"g{os.getpid()}-{secrets.token_hex(3)}"
    workdir.mkdir(parents=True, exist_ok=True)
    ser_path = workdir / "serial.sock"
    qmp_path = workdir / "qmp.sock"
    for p in (ser_path, qmp_path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(ser_path))
    lsock.listen(1)
    args = [*qemu_args,
            "-chardev", f"socket,id=guestlab-serial,path={ser_path}",
            "-serial", "chardev:guestlab-serial",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    (workdir / "qemu.cmdline").write_text(" ".join(map(str, [*qemu_cmd, *args])) + "\n")
    qlog = open(workdir / "qemu.log", "wb")
    t_start = time.monotonic()
    proc = subprocess.Popen([*qemu_cmd, *args], stdin=subprocess.DEVNULL, stdout=qlog,
                            stderr=subprocess.STDOUT)
    qlog.close()
    try:
        lsock.settimeout(0.2)
        deadline = t_start + 30
        while True:
            try:
                conn, _ = lsock.accept()
                break
            except TimeoutError:
                if proc.poll() is not None:
                    raise GuestError(f"QEMU exited with status {proc.returncode} at start:\n"
                                     + (workdir / "qemu.log").read_text(errors="replace")) from None
                if time.monotonic() > deadline:
                    raise GuestTimeout("QEMU did not connect to the serial socket within 30s") from None
        conn.settimeout(None)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        raise
    finally:
        lsock.close()
        with contextlib.suppress(FileNotFoundError):
            ser_path.unlink()
    g = Guest(proc, workdir, _Serial(conn, workdir / "console.log"), t_start, keep_workdir)
    try:
        g.wait_ready(ready_timeout)
    except BaseException:
        g.close()
        raise
    return g


# --------------------------------------------------------------------------
# The built-in virtio-mem smoke test.
# --------------------------------------------------------------------------

def _wait_memtotal(g: Guest, want_kb: int, tol_kb: int, timeout: float) -> tuple[float, int]:
    """Poll MemTotal until |MemTotal - want| <= tol; (seconds, MemTotal)."""
    t = time.monotonic()
    last = None
    while time.monotonic() - t < timeout:
        last = g.meminfo()["MemTotal"]
        if abs(last - want_kb) <= tol_kb:
            return time.monotonic() - t, last
        time.sleep(0.1)
    raise GuestTimeout(f"MemTotal stayed at {last} kB, expected {want_kb} kB ± {tol_kb} "
                       f"within {timeout}s")


def smoke_builtin(verbose: bool = True) -> dict:
    def say(msg):
        if verbose:
            print(f"[smoke] {msg}", flush=True)

    info = guestlab_info()
    say(f"QEMU {info['versions']['qemu']}, kernel {info['versions']['kernel_release']}")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with boot(builtin_virtio_mem_args(info)) as g:
        timings["qemu start -> first console byte"] = (g.serial.first_byte_at or t0) - g.t_start
        timings["qemu start -> agent ready"] = g.t_ready - g.t_start
        say(f"agent ready after {timings['qemu start -> agent ready']:.2f}s: {g.ready_line}")
        say(f"workdir {g.workdir}")

        # The driver probed?
        deadline = time.monotonic() + 60
        while True:
            st, probe = g.run("dmesg | grep virtio_mem")
            if st == 0 and "requested size" in probe:
                break
            if time.monotonic() > deadline:
                raise GuestError(f"virtio_mem did not probe:\n{g.dmesg()}")
            time.sleep(0.2)
        timings["qemu start -> probe seen in dmesg"] = time.monotonic() - g.t_start
        m = re.search(r"^\[\s*([\d.]+)\] virtio_mem", probe, re.M)
        if m:
            timings["guest uptime at probe (dmesg)"] = float(m.group(1))
        say("driver probed:\n    " + probe.replace("\n", "\n    "))
        print(g.check("cat /run/guestlab/init.log"))

        before = {k: int(v) for k, v in re.findall(
            r"^(\S+):\s+(\d+)", g.check("cat /run/guestlab/meminfo.before-modules"), re.M)}
        base = before["MemTotal"]
        say(f"MemTotal before virtio_mem: {base} kB")

        # +256 MiB at boot
        dt, total = _wait_memtotal(g, base + 256 * 1024, 4096, 60)
        timings["qemu start -> MemTotal +256 MiB"] = time.monotonic() - g.t_start
        say(f"MemTotal {total} kB (+{(total - base) / 1024:.1f} MiB)")
        plugged = g.qmp("qom-get", {"path": "/machine/peripheral/vmem0", "property": "size"})
        say(f"QMP: vmem0 size (plugged) = {plugged / MiB:.0f} MiB")

        st, blocks = g.run("ls /sys/devices/system/memory")
        say(f"memory blocks: {' '.join(blocks.split())}")
        online = g.check("for b in /sys/devices/system/memory/memory*; do "
                         "echo $(basename $b) $(cat $b/state) $(cat $b/valid_zones); done")
        say("block states:\n    " + online.strip().replace("\n", "\n    "))

        # resize up: 512M
        for target in (512, 128):
            t = time.monotonic()
            g.qmp("qom-set", {"path": "/machine/peripheral/vmem0",
                              "property": "requested-size", "value": target * MiB})
            dt, total = _wait_memtotal(g, base + target * 1024, 4096, 120)
            key = f"qom-set requested-size {target}M -> MemTotal follows"
            timings[key] = time.monotonic() - t
            plugged = g.qmp("qom-get", {"path": "/machine/peripheral/vmem0",
                                        "property": "size"})
            say(f"requested {target}M: MemTotal {total} kB (+{(total - base) / 1024:.1f} MiB) "
                f"after {timings[key]:.2f}s; plugged {plugged / MiB:.0f} MiB")

        # the agent: a pattern in a tmpfs file
        n = 16 * MiB
        t = time.monotonic()
        out = g.check(f"yes vmemdev | head -c {n} > /tmp/pattern && sha256sum /tmp/pattern "
                      f"&& grep Shmem: /proc/meminfo", timeout=120)
        want = hashlib.sha256((b"vmemdev\n" * (n // 8 + 1))[:n]).hexdigest()
        if want not in out:
            raise GuestError(f"pattern checksum mismatch: {out}")
        timings["write+hash 16 MiB pattern in guest tmpfs"] = time.monotonic() - t
        say(f"pattern ok: {out.split()[0][:16]}...")

        # big output over the serial line
        t = time.monotonic()
        dm = g.dmesg()
        timings[f"dmesg over serial ({len(dm)} bytes)"] = time.monotonic() - t
        bad = [l for l in dm.splitlines()
               if re.search(r"WARNING|BUG|Call Trace|error|fail|virtio_mem.*(?:unplug|plug).*fail",
                            l, re.I)]
        if bad:
            say("dmesg lines worth a look:\n    " + "\n    ".join(bad))
        status, out = g.run("echo 'multi\nline' && exit 3")
        assert (status, out) == (3, "multi\nline\n"), (status, out)
        status, out = g.run("printf no-newline")
        assert (status, out) == (0, "no-newline"), (status, out)

        t = time.monotonic()
        rc = g.poweroff(timeout=30)
        timings["poweroff -> QEMU exit"] = time.monotonic() - t
        say(f"QEMU exited with status {rc}")
        if rc != 0:
            raise GuestError(f"QEMU exit status {rc}")
        events = [e["event"] for e in (g._qmp.events if g._qmp else [])]
        if events:
            say(f"QMP events seen: {', '.join(events)}")
        with contextlib.suppress(OSError):
            ql = g.qemu_log.read_text(errors="replace").strip()
            if ql:
                say("qemu.log:\n    " + ql.replace("\n", "\n    "))
    timings["total"] = time.monotonic() - t0
    shutil.rmtree(g.workdir, ignore_errors=True)  # kept (and named) on failure
    print("\ntimings:")
    for k, v in timings.items():
        print(f"  {k:55s} {v:7.2f} s")
    return timings


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builtin", action="store_true",
                    help="smoke-test the guest against QEMU's built-in virtio-mem-pci")
    args = ap.parse_args()
    if not args.builtin:
        ap.print_help()
        return 2
    try:
        smoke_builtin()
    except GuestError as e:
        print(f"smoke: FAILED: {e}", file=sys.stderr)
        return 1
    print("smoke: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
