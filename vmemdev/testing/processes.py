"""Finding the worker `vmemdev hold` runs, to kill it the way a crash would."""

from __future__ import annotations

import os


def only_child(pid: int) -> int | None:
    """The one child process of ``pid`` (None while it has none, or several)."""
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children[0] if len(children) == 1 else None
