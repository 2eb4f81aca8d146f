"""Operator limits on what the device may hold, with cgroup-style names."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..protocol.control import LIMIT_NAMES
from .model import check_block_multiple

MEMORY_MAX, MEMORY_HIGH = LIMIT_NAMES
__all__ = ["LIMIT_NAMES", "MEMORY_MAX", "MEMORY_HIGH", "Limits"]


@dataclass
class Limits:
    memory_max: int | None = None  # plugged bytes never exceed this
    memory_high: int | None = None  # host footprint above this lowers requested_size

    def get(self, name: str) -> int | None:
        return {MEMORY_MAX: self.memory_max, MEMORY_HIGH: self.memory_high}[name]

    def set(self, name: str, value: int | None, block_size: int) -> None:
        """Raises ConfigError for an unknown name or a value off the block grid."""
        if name not in LIMIT_NAMES:
            raise ConfigError(f"unknown limit {name!r} ({', '.join(LIMIT_NAMES)})")
        if value is not None:
            check_block_multiple(name, value, block_size)
        if name == MEMORY_MAX:
            self.memory_max = value
        else:
            self.memory_high = value

    def to_json(self) -> dict[str, int | None]:
        return {MEMORY_MAX: self.memory_max, MEMORY_HIGH: self.memory_high}

