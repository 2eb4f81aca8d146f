"""Request counters and a latency window for ``vmemdev ctl stats``."""

from __future__ import annotations

import collections
from typing import Any


class Stats:
    def __init__(self, window: int = 10000):
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.nacks_by_reason: collections.Counter[str] = collections.Counter()
        self.busy_by_reason: collections.Counter[str] = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=window)
        self.bytes_discarded = 0
        self.bytes_preallocated = 0
        self.hot_add_failures = 0  # rollbacks of a memory block the guest could not add

    def record(self, kind: str, outcome: str, seconds: float) -> None:
        self.requests[(kind, outcome)] += 1
        self.latencies.append(seconds)

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6, 1) if lat else None

        by_type: dict[str, dict[str, int]] = {}
        for (kind, outcome), n in sorted(self.requests.items()):
            by_type.setdefault(kind, {})[outcome] = n
        return {
            "requests": by_type,
            "nacks_by_reason": dict(self.nacks_by_reason),
            "busy_by_reason": dict(self.busy_by_reason),
            "latency_us": {"samples": len(lat), "p50": pct(0.5), "p99": pct(0.99),
                           "max": round(lat[-1] * 1e6, 1) if lat else None},
            "bytes_discarded": self.bytes_discarded,
            "bytes_preallocated": self.bytes_preallocated,
            "hot_add_failures": self.hot_add_failures,
        }
