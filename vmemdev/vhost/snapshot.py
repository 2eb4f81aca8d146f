"""A connection's negotiated vhost-user state as data, and back. Sans-IO.

QEMU performs the handshake once per connection and never repeats it. For a
successor process to serve a connection it inherited (its fds kept across
the death of the process that accepted it), it needs what the handshake
established: features, status, the memory table and each ring's
configuration and lifecycle state. ``snapshot`` takes it from an engine;
``restore`` builds an engine that serves the same connection.

fds are not in the record: the memory table's regions are listed in order,
and ``restore`` takes their fds in that order; the kick/call/err eventfds
stay with the daemon, which keeps them by ring and role.

A restored ring resumes from the used index in guest memory: a request the
dead process took but did not answer is taken again.

``EngineRecord.from_json`` refuses anything that is not exactly a record of
this format (StateError, naming what is wrong): a bad record is never read
as a fresh connection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import OperatorError, PeerError
from ..protocol.vhost_user import MemoryRegion, VringAddr
from .engine import Engine
from .interfaces import Device, GuestMemory
from .rings import RingState

FORMAT = 1
U64 = (1 << 64) - 1


class StateError(OperatorError):
    """A saved connection state cannot be used (truncated, corrupted, foreign)."""


@dataclass(frozen=True)
class RingRecord:
    num: int
    addr: tuple[int, ...] | None  # flags, desc, used, avail, log (user addresses)
    state: str  # a RingState value
    broken_reason: str | None


@dataclass(frozen=True)
class EngineRecord:
    features: int
    protocol_features: int
    owner: bool
    status: int
    regions: tuple[tuple[int, ...], ...]  # gpa, size, user address, mmap offset
    rings: tuple[RingRecord, ...]

    def to_obj(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_obj(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> EngineRecord:
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StateError(f"not a connection state record (invalid JSON: {exc})") from exc
        obj = _dict(raw, "record", {"format", "features", "protocol_features", "owner", "status",
                                    "regions", "rings"})
        if obj["format"] != FORMAT:
            raise StateError(f"connection state format {obj['format']!r}; this version reads {FORMAT}")
        return cls(
            _int(obj["features"], "features", U64),
            _int(obj["protocol_features"], "protocol_features", U64),
            _bool(obj["owner"], "owner"),
            _int(obj["status"], "status", 0xFF),
            tuple(_ints(r, f"regions[{i}]", 4, U64) for i, r in enumerate(_list(obj["regions"], "regions"))),
            tuple(_ring(r, i) for i, r in enumerate(_list(obj["rings"], "rings"))),
        )


def snapshot(engine: Engine) -> EngineRecord:
    rings = []
    for ring in engine.rings:  # (no avail index: a successor resumes from the used index)
        a = ring.addr
        rings.append(RingRecord(
            ring.num,
            None if a is None else (a.flags, a.desc_user_addr, a.used_user_addr, a.avail_user_addr,
                                    a.log_guest_addr),
            ring.state.value, ring.broken_reason))
    regions = tuple((d.guest_phys_addr, d.memory_size, d.userspace_addr, d.mmap_offset)
                    for d in engine.memory.table())
    return EngineRecord(engine.features, engine.protocol_features, engine.owner, engine.status,
                        regions, tuple(rings))


def restore(device: Device, memory: GuestMemory, record: EngineRecord, region_fds: Sequence[int]) -> Engine:
    """An engine in the recorded state over ``memory`` (empty), which takes the
    region fds (in the record's order). Raises StateError when the record does
    not fit this device or its memory cannot be mapped again."""
    if len(record.rings) != device.num_queues:
        raise StateError(f"the record has {len(record.rings)} rings, the device {device.num_queues}")
    if len(region_fds) != len(record.regions):
        raise StateError(f"the record has {len(record.regions)} memory regions but "
                         f"{len(region_fds)} fds were kept")
    engine = Engine(device, memory)
    engine.features = record.features
    engine.protocol_features = record.protocol_features
    engine.owner = record.owner
    engine.status = record.status
    if record.features:  # none yet: SET_FEATURES has not come (a handshake in progress)
        device.set_features(record.features & device.features)
    try:
        for (gpa, size, uaddr, offset), fd in zip(record.regions, region_fds, strict=True):
            memory.add(MemoryRegion(gpa, size, uaddr, offset), fd)
    except PeerError as exc:  # the fds or the record do not fit each other
        raise StateError(f"the recorded memory table cannot be mapped again: {exc}") from exc
    for index, (ring, saved) in enumerate(zip(engine.rings, record.rings, strict=True)):
        ring.num = saved.num
        ring.addr = None if saved.addr is None else VringAddr(index, *saved.addr)
        ring.state = RingState(saved.state)
        ring.broken_reason = saved.broken_reason
        ring.last_avail_idx = 0
        problem = ring.map(memory)
        if problem is not None:
            raise StateError(f"ring {index} cannot be mapped again: {problem}")
        if ring.queue is not None:  # resume where the guest sees us
            ring.queue.last_avail_idx = ring.queue.used_idx
    return engine


# --- strict readers -----------------------------------------------------------------


def _dict(value: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StateError(f"{what}: expected an object")
    if set(value) != keys:
        raise StateError(f"{what}: keys {sorted(value)}, expected {sorted(keys)}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise StateError(f"{what}: expected a list")
    return value


def _int(value: Any, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise StateError(f"{what}: {value!r} is not an integer in 0..{maximum:#x}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise StateError(f"{what}: {value!r} is not true or false")
    return value


def _ints(value: Any, what: str, count: int, maximum: int) -> tuple[int, ...]:
    items = _list(value, what)
    if len(items) != count:
        raise StateError(f"{what}: {len(items)} numbers, expected {count}")
    return tuple(_int(v, f"{what}[{i}]", maximum) for i, v in enumerate(items))


def _ring(value: Any, index: int) -> RingRecord:
    what = f"rings[{index}]"
    obj = _dict(value, what, {"num", "addr", "state", "broken_reason"})
    states = {s.value for s in RingState}
    if obj["state"] not in states:
        raise StateError(f"{what}.state: {obj['state']!r} is not one of {sorted(states)}")
    reason = obj["broken_reason"]
    if reason is not None and not isinstance(reason, str):
        raise StateError(f"{what}.broken_reason: expected a string or null")
    addr = None if obj["addr"] is None else _ints(obj["addr"], f"{what}.addr", 5, U64)
    return RingRecord(_int(obj["num"], f"{what}.num", 32768), addr, obj["state"], reason)
