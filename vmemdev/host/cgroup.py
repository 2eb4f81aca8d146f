"""The VM's memory cgroup, read as the kernel enforces it.

The kernel charges a page to the cgroup of the task that allocates it and
refuses a charge when *any* cgroup from there up to the root is at its
limit (reclaim, then the OOM killer). So the figures that matter are, at
every level, the limit and the counter the kernel compares with it:

- v1: ``memory.limit_in_bytes`` and ``memory.usage_in_bytes`` (the page
  counter itself, kernel memory and per-CPU charge batches included; the
  "fuzzy" of the documentation is exactly what the kernel checks);
  ancestors count while ``memory.use_hierarchy`` is 1.
- v2: ``memory.current`` against the lower of ``memory.max`` and
  ``memory.high`` (above high the cgroup's tasks are throttled).

``read`` returns the level with the least headroom. What a plug may take
of it is decided in ``vmemdev.virtio_mem.headroom``.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .interface import CgroupReading

V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as a value near 2^63


class Cgroup:
    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        if os.path.exists(os.path.join(self.path, "memory.limit_in_bytes")):
            self.version = 1
        elif os.path.exists(os.path.join(self.path, "memory.max")):
            self.version = 2
        else:
            raise ConfigError(
                f"{path} is not a memory cgroup (no memory.limit_in_bytes or memory.max): "
                "give the VM's cgroup under /sys/fs/cgroup/memory (v1) or a v2 cgroup "
                "with the memory controller enabled"
            )
        self.read()  # fail now, at start-up, if it cannot be read

    def read(self) -> CgroupReading:
        """The binding limit and its usage now; raises OSError if the cgroup went away."""
        levels = [self._level(path) for path in self._hierarchy()]
        limited = [r for r in levels if r.limit is not None]
        if not limited:
            return CgroupReading(None, levels[0].usage, None)
        return min(limited, key=lambda r: r.limit - r.usage)  # type: ignore[operator]

    def usage(self) -> int:
        """This cgroup's own charge (not the binding level's); raises OSError."""
        return self._level(self.path).usage

    def _hierarchy(self) -> list[str]:
        """This cgroup and the ancestors whose limits apply to it."""
        paths = [self.path]
        counter = "memory.usage_in_bytes" if self.version == 1 else "memory.max"
        while True:
            parent = os.path.dirname(paths[-1])
            if parent == paths[-1] or not os.path.exists(os.path.join(parent, counter)):
                return paths
            if self.version == 1 and _read(parent, "memory.use_hierarchy").strip() != "1":
                return paths
            paths.append(parent)

    def _level(self, path: str) -> CgroupReading:
        if self.version == 1:
            raw = int(_read(path, "memory.limit_in_bytes"))
            usage = int(_read(path, "memory.usage_in_bytes"))
            return CgroupReading(None if raw >= V1_UNLIMITED else raw, usage, path)
        limits = [int(v) for v in (_read(path, "memory.max").strip(), _read_high(path)) if v != "max"]
        return CgroupReading(min(limits) if limits else None, int(_read(path, "memory.current")), path)


def _read(path: str, name: str) -> str:
    with open(os.path.join(path, name)) as f:
        return f.read()


def _read_high(path: str) -> str:
    try:
        return _read(path, "memory.high").strip()
    except FileNotFoundError:
        return "max"
