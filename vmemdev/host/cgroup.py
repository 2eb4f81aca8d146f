"""Host-side limits: the VM's memory cgroup, read the way the kernel documents.

cgroup v1 (memory controller): the limit is ``memory.limit_in_bytes`` (and
``hierarchical_memory_limit`` in memory.stat, which folds in the parents);
usage is taken from memory.stat (``total_rss + total_cache``, cache
including shmem) because ``usage_in_bytes`` is documented as fuzzy.
cgroup v2: ``memory.max`` and ``memory.current``.

A plug is acknowledged only if the cgroup has headroom for it plus a
page-table margin (1/512 of the size, what the guest's page tables and the
host's cost at most on x86-64): a cgroup at its hard limit OOM-kills, so
the device answers BUSY instead (the driver retries on a timer).
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .interface import CgroupReading

V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as a value near 2^63


def page_table_margin(size: int) -> int:
    return -(-size // 512)


class Cgroup:
    def __init__(self, path: str):
        self.path = path
        if os.path.exists(os.path.join(path, "memory.limit_in_bytes")):
            self.version = 1
        elif os.path.exists(os.path.join(path, "memory.max")):
            self.version = 2
        else:
            raise ConfigError(
                f"{path} is not a memory cgroup (no memory.limit_in_bytes or memory.max): "
                "give the VM's cgroup under /sys/fs/cgroup/memory (v1) or a v2 cgroup "
                "with the memory controller enabled"
            )
        self.read()  # fail now, at start-up, if it cannot be read

    def _file(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def _stat(self) -> dict[str, int]:
        out = {}
        for line in self._file("memory.stat").splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out

    def read(self) -> CgroupReading:
        """Limit and usage now; raises OSError if the cgroup went away."""
        if self.version == 1:
            stat = self._stat()
            limit = min(int(self._file("memory.limit_in_bytes")),
                        stat.get("hierarchical_memory_limit", V1_UNLIMITED))
            usage = stat.get("total_rss", stat.get("rss", 0)) + stat.get("total_cache", stat.get("cache", 0))
            return CgroupReading(None if limit >= V1_UNLIMITED else limit, usage)
        raw = self._file("memory.max").strip()
        return CgroupReading(None if raw == "max" else int(raw), int(self._file("memory.current")))

    def check_headroom(self, size: int) -> str | None:
        """None if ``size`` more bytes fit; otherwise the reason, for the log and the BUSY."""
        reading = self.read()
        room = reading.headroom()
        need = size + page_table_margin(size)
        if room is not None and room < need:
            return (
                f"cgroup {self.path} has {max(room, 0)} bytes of headroom "
                f"(limit {reading.limit}, usage {reading.usage}), {need} needed"
            )
        return None
