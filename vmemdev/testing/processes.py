"""Finding the worker `vmemdev hold` runs, to kill it the way a crash would,
and holding it inside a syscall (strace) to kill it there."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time


def only_child(pid: int) -> int | None:
    """The one child process of ``pid`` (None while it has none, or several)."""
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children[0] if len(children) == 1 else None


class SyscallHold:
    """``strace -f -p PID`` holding the ``nth`` call of ``syscall`` (counted
    per thread) for ``delay``: at its entry (``at="enter"``, the kernel has
    done nothing yet) or at its exit (``at="exit"``, the kernel's work done,
    not yet returned to the process). strace prints the call when it stops
    there (at the entry without its result, at the exit with it), so
    :meth:`wait_output` returns once the process is provably inside it, and
    :meth:`kill` kills it there. Attached when the constructor returns. Needs
    ptrace rights on PID."""

    def __init__(self, pid: int, syscall: str, *, at: str = "enter", nth: int = 1,
                 delay: str = "120s", strace: str = "strace", timeout: float = 20.0):
        self.pid = pid
        self.output = ""
        self.proc = subprocess.Popen(
            [strace, "-f", "-p", str(pid), "-e", f"trace={syscall}", "-e", "signal=none",
             "-e", f"inject={syscall}:delay_{at}={delay}:when={nth}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self._fd = self.proc.stderr.fileno()
        os.set_blocking(self._fd, False)
        try:
            self.wait_output(rf"Process {pid} attached", timeout)  # printed once all its threads are
        except BaseException:
            self.close()
            raise

    def wait_output(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in strace's output (trace and
        messages), once strace printed it. Raises TimeoutError, or
        RuntimeError if strace ended without printing it."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.output)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"strace did not print {pattern!r} within {timeout:.0f}s; "
                                   f"it printed:\n{self.output}")
            if select.select([self._fd], [], [], left)[0]:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise RuntimeError(f"strace ended (status {self.proc.wait()}) without printing "
                                       f"{pattern!r}; it printed:\n{self.output}")
                self.output += chunk.decode(errors="replace")
        return match

    def kill(self) -> None:
        """kill -9 the process where it is held, then strace: the held
        thread never runs again (a fatal signal aborts a call held at its
        entry), but strace's delay would hold its exit too, and strace does
        not always detach from a dying process on SIGTERM."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.kill()
        self.close()

    def close(self) -> None:
        """Detach (a held call then goes on) if the traced process lives on."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=20)
        assert self.proc.stderr is not None
        if not self.proc.stderr.closed:
            with self.proc.stderr:
                self.output += (self.proc.stderr.read() or b"").decode(errors="replace")

    def __enter__(self) -> SyscallHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
