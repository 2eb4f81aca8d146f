"""A throw-away cgroup v1 memory cgroup for tests and measurements.

    cg = ChildMemoryCgroup(limit=384 << 20)
    subprocess.Popen([...], preexec_fn=cg.enter)   # the child is charged there
    ...
    assert cg.oom_kills() == 0 and cg.failcnt() == 0
    cg.remove()

It is made under this process's own memory cgroup, so the limits of its
parents apply to it as they would to a VM's. Needs root and the v1 memory
controller at /sys/fs/cgroup/memory (``unavailable()`` says why not).
"""

from __future__ import annotations

import os
import time
import uuid

V1_ROOT = "/sys/fs/cgroup/memory"


def unavailable() -> str | None:
    """None if a child can be made here, else why not."""
    if not os.path.exists(os.path.join(V1_ROOT, "memory.limit_in_bytes")):
        return f"no cgroup v1 memory controller at {V1_ROOT}"
    if not os.access(V1_ROOT, os.W_OK):
        return f"{V1_ROOT} is not writable (run as root)"
    return None


def own_memory_cgroup() -> str:
    """This process's memory cgroup directory."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return V1_ROOT + path
    return V1_ROOT


class ChildMemoryCgroup:
    def __init__(self, prefix: str = "vmemdev-test", limit: int | None = None):
        self.path = os.path.join(own_memory_cgroup(), f"{prefix}-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.path)
        if limit is not None:
            self.write("memory.limit_in_bytes", limit)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read(self, name: str) -> str:
        with open(self.file(name)) as f:
            return f.read()

    def write(self, name: str, value: object) -> None:
        with open(self.file(name), "w") as f:
            f.write(str(value))

    def usage(self) -> int:
        return int(self.read("memory.usage_in_bytes"))

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in self.read("memory.oom_control").splitlines())
        return int(fields["oom_kill"])

    def failcnt(self) -> int:
        """How often a charge hit the limit (each time: reclaim, then maybe the OOM killer)."""
        return int(self.read("memory.failcnt"))

    def enter(self, pid: int | None = None) -> None:
        """Move ``pid`` (default: the calling process, e.g. as a preexec_fn) here."""
        self.write("cgroup.procs", os.getpid() if pid is None else pid)

    def remove(self, timeout: float = 10.0) -> bool:
        """rmdir once its processes are gone; False if it could not be removed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
