"""Assertions for the host-memory accounting invariants (README, "Accounting").

Each raises AssertionError with the numbers that broke it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..host.cgroup import Cgroup


def assert_allocated_at_most_plugged(lab, slack: int | None = None) -> None:
    """Invariant 3: allocated bytes ≤ plugged bytes (+ one block of slack)."""
    slack = lab.block_size if slack is None else slack
    allocated, plugged = lab.allocated(), lab.plugged()
    assert allocated <= plugged + slack, f"host allocated {allocated} > plugged {plugged} + {slack}"


def assert_allocation_within_plugged(lab) -> None:
    """Invariant 3: every allocated extent lies inside plugged blocks."""
    ranges = lab.accounting()["plugged_ranges"]
    for start, length in lab.extents():
        end = start + length
        assert any(p <= start and end <= p + n for p, n in ranges), \
            f"allocated extent {start:#x}+{length:#x} is outside the plugged blocks {ranges}"


@dataclass
class ChargeDelta:
    before: int
    after: int | None = None

    @property
    def delta(self) -> int:
        return (self.after or 0) - self.before


@contextlib.contextmanager
def cgroup_charge(path: str):
    """Measure how a block of code changed a memory cgroup's usage (v1 or v2).

        with cgroup_charge("/sys/fs/cgroup/memory/vm0") as charge:
            lab.resize("256M")
        assert abs(charge.delta - 256 * MiB) < 8 * MiB
    """
    cgroup = Cgroup(path)
    result = ChargeDelta(cgroup.usage())
    yield result
    result.after = cgroup.usage()
