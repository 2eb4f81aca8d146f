"""What a successor process needs to resume the attached front-end's connection.

With ``serve --state-file PATH`` under a service manager that keeps fds
(`vmemdev hold`, or systemd with ``FileDescriptorStoreMax=``), the serving
process keeps, at every moment:

- every fd of the connection in the fd store (``storedfds.py``): "conn"
  (the vhost-user socket) and an entry per file for the others (the backend
  channel, each ring's kick/call/err eventfds, the memory table's regions);
- in PATH (JSON, written atomically: a new file renamed over the old one, on
  every vhost-user message that may change it and on control-plane changes),
  the negotiated state (``vhost.snapshot``), the fd store entry of each role
  ("conn", "backend", "kick0", "mem0"...) and the name and id of PATH.dev;
- in PATH.dev (``devrecord.py``: a fixed layout, mapped shared, two slots
  written alternately, each with a sequence number and a crc written last),
  the device model (bitmap, requested and usable size) and the answer to
  the last request that changed it, saved before that answer is published
  in the used ring. A request's save is a few stores into the mapping, not
  a file write: they are in the page cache at once and survive the death of
  the process at any instant;
- in PATH.msg (``inflight.py``), the step reached with the vhost-user
  message in flight, which stays on the socket until it is handled.

A successor started with those fds and files serves the same connection
(QEMU never sees it close): the rings resume from the used index in guest
memory, so a request the dead process took but did not answer is taken
again; if the dead process had already changed the device for it, the saved
answer is given instead of deciding it again (a re-delivered PLUG gets its
ACK, not ERROR); the message in flight is finished (``inflight.py``). Its
first act is to write the files anew from what it restored (PATH.dev under
the same id, so PATH always names the PATH.dev on disk).

Format: a number in PATH (``FORMAT``, 3: PATH names the fd store entries,
and PATH.msg exists). A release reads its own format and the ones before
(``READS``; format 2 named no entries: they carried the roles' names, and
had no PATH.msg; format 1 was PATH alone, the device and answer inline, the
bitmap in hex) and writes its own.

Not covered: a death between accepting a connection and storing it (the
connection was only ever in the dead process: QEMU sees it close).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..crashpoints import crash_point
from ..vhost.snapshot import EngineRecord, StateError
from ..virtio_mem.model import DeviceRecord
from . import devrecord
from .inflight import InFlight
from .storedfds import StoredFds, is_ours

log = logging.getLogger(__name__)

FORMAT = 3  # what this version writes
READS = (1, 2, 3)  # what load() reads: its own format and the ones before (an upgrade checks the new version's)


@dataclass(frozen=True)
class SavedAnswer:
    ring: int
    head: int
    request: bytes
    response: bytes
    used_idx: int  # the ring's used index once this answer is published

    def to_json(self) -> dict[str, Any]:
        return {"ring": self.ring, "head": self.head, "request": self.request.hex(),
                "response": self.response.hex(), "used_idx": self.used_idx}

    def as_tuple(self) -> tuple[int, int, bytes, bytes, int]:
        return self.ring, self.head, self.request, self.response, self.used_idx


@dataclass(frozen=True)
class SavedState:
    engine: EngineRecord
    device: dict[str, Any]  # for VirtioMemModel.restore
    answer: SavedAnswer | None
    restores: Restores | None = None  # how often this connection was resumed before
    fdnames: dict[str, str] | None = None  # role -> fd store entry (None before format 3: the role's name)

    def entry_names(self, store: dict[str, int]) -> dict[str, str]:
        """role -> the fd store entry that holds its fd. Raises StateError for
        an entry the state names and the store lacks."""
        names = self.fdnames
        if names is None:  # format 2: entries named by their roles ("mem0+mem1")
            names = {role: name for name in store if is_ours(name) for role in name.split("+")}
        missing = sorted({name for name in names.values() if name not in store})
        if missing:
            raise StateError(f"the fd store lacks {', '.join(missing)}")
        return names


@dataclass(frozen=True)
class Restores:
    """How many times this connection was resumed by a new program (after a
    death or for an upgrade), the last time and why: kept in PATH, so the
    count spans every process that served the connection."""

    count: int
    last: float
    by: str  # "restart" or "upgrade"

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "last": self.last, "by": self.by}

    @classmethod
    def from_json(cls, raw: object) -> Restores:
        if not isinstance(raw, dict) or set(raw) != {"count", "last", "by"} \
                or not isinstance(raw["count"], int) or isinstance(raw["count"], bool) or raw["count"] < 1 \
                or not isinstance(raw["last"], (int, float)) or raw["by"] not in ("restart", "upgrade"):
            raise ValueError(f"restores: expected count >= 1, last and by (restart or upgrade), not {raw!r}")
        return cls(raw["count"], float(raw["last"]), raw["by"])


@dataclass
class Persistence:
    """What a connection needs to keep itself resumable (given by the runtime)."""

    keeper: ConnectionKeeper
    record: Callable[[], DeviceRecord]  # the device's state, for the files
    answer: SavedAnswer | None = None  # a successor's: the last answer of the dead process


class ConnectionKeeper:
    def __init__(self, path: str):
        self.path = path
        self.device_path = path + ".dev"
        self.fds = StoredFds()
        self.message_path = path + ".msg"
        self._inflight: InFlight | None = None
        self._engine: tuple[EngineRecord, dict[str, Any]] | None = None  # it rarely changes
        # PATH.dev, open once the first full save made it: its answer() is the per-request save.
        self.device_record: devrecord.DeviceRecordFile | None = None
        self._id = 0  # pairs PATH with PATH.dev
        self.restores: Restores | None = None  # saved in PATH: set by a successor

    @property
    def inflight(self) -> InFlight:
        """The journal of the vhost-user message in flight (PATH.msg, opened on
        first use). Raises StateError when the file there is not one."""
        if self._inflight is None:
            self._inflight = InFlight(self.message_path)
        return self._inflight

    def save(self, engine: EngineRecord, device: DeviceRecord, answer: SavedAnswer | None = None,
             fds: dict[str, int] | None = None) -> None:
        """Everything, each file atomically: the connection's fds (``fds``, by
        role) staged in the fd store, the device's record in PATH.dev (a slot,
        or the whole file anew when it is not open yet or the change does not
        fit a slot), then the connection's in PATH (a new file renamed over
        the old one), which names PATH.dev by its id and the fds' entries;
        then the fd store entries nothing names are removed. Raises OSError."""
        if fds is not None:
            self.fds.stage(fds)
        parts = None if answer is None else answer.as_tuple()
        if self.device_record is None:
            self._open(device, parts)
        elif not self.save_device(device, parts):
            self._rewrite(device, parts)
        if self._engine is None or self._engine[0] != engine:
            self._engine = (engine, engine.to_obj())
        state: dict[str, Any] = {"format": FORMAT, "engine": self._engine[1],
                                 "device": {"file": os.path.basename(self.device_path), "id": f"{self._id:016x}"},
                                 "fds": self.fds.roles}
        if self.restores is not None:
            state["restores"] = self.restores.to_json()
        text = json.dumps(state)
        temporary = self.path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.rename(temporary, self.path)
        if fds is not None:
            self.fds.commit()

    def save_device(self, device: DeviceRecord, answer: tuple[int, int, bytes, bytes, int] | None) -> bool:
        """Save the device's state and ``answer`` in a slot of PATH.dev (a few
        stores into its mapping), even if nothing changed. False: nothing
        saved (PATH.dev not open, or the change does not fit a slot): a full
        ``save`` is needed. The per-request path calls
        ``device_record.answer`` itself."""
        f = self.device_record
        if f is None:
            return False
        if answer is None:
            return f.answer(device, -1, 0, b"", b"", 0) is True
        return f.answer(device, *answer) is not False

    def _open(self, device: DeviceRecord, answer: tuple[int, int, bytes, bytes, int] | None) -> None:
        # A successor keeps the id of the state it resumed from: at every instant
        # PATH names the PATH.dev that is there.
        self._id = self._id_on_disk() or secrets.randbits(63) | 1
        self._create(device, answer, 1)

    def _rewrite(self, device: DeviceRecord, answer: tuple[int, int, bytes, bytes, int] | None) -> None:
        """PATH.dev anew, under the same id (so PATH names it at every instant)."""
        f = self.device_record
        assert f is not None
        self.device_record = None
        f.close()
        self._create(device, answer, f.seq + 1)

    def _create(self, device: DeviceRecord, answer: tuple[int, int, bytes, bytes, int] | None, seq: int) -> None:
        g = device.geometry
        device.bitmap.take_touched()  # all of it is written
        self.device_record = devrecord.create(
            self.device_path, id=self._id, geometry=(g.addr, g.region_size, g.block_size), nblocks=g.nblocks,
            requested=device.requested_size, usable=device.usable_region_size, bitmap=device.bitmap.to_bytes(),
            answer=answer, seq=seq, changes=device.changes)
        if os.environ.get("VMEMDEV_CRASH_POINT"):  # the tests': record-payload, record-crc (crashpoints.py)
            self.device_record._crash = crash_point

    def _id_on_disk(self) -> int:
        try:
            with open(self.path, "rb") as f:
                raw = json.loads(f.read())
            return int(raw["device"]["id"], 16) if raw.get("format") in (2, 3) else 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0

    def forget(self) -> None:
        """The connection ended for good: nothing to resume. The files go first:
        a death in between leaves entries no state names, which a successor
        drops."""
        if self.device_record is not None:
            self.device_record.close()
            self.device_record = None
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None
        for path in state_files(self.path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.fds.forget()

    def adopt(self, store: dict[str, int], roles: dict[str, str]) -> None:
        """A successor: ``store`` is what the fd store holds for us, ``roles``
        which entry the state names for each role (``SavedState.entry_names``)."""
        self.fds.adopt(store, roles)


def state_files(path: str) -> tuple[str, ...]:
    """Every file a state at ``path`` consists of, temporaries included."""
    return (path, path + ".new", path + ".dev", path + ".dev.new", path + ".msg")


def load(path: str) -> SavedState:
    """Read a saved state (format 2: PATH and PATH.dev; format 1: PATH alone);
    raises StateError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
        if not isinstance(raw, dict) or raw.get("format") not in READS:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise ValueError(f"format {found!r}, this version reads {', '.join(map(str, READS))}")
        if raw["format"] == 1:
            return _load_1(raw)
        keys = {"format", "engine", "device"} | ({"fds"} if raw["format"] == 3 else set())
        if set(raw) - {"restores"} != keys:
            raise ValueError(f"expected {', '.join(sorted(keys))} (and restores)")
        fdnames = _fdnames(raw["fds"]) if raw["format"] == 3 else None
        restores = Restores.from_json(raw["restores"]) if "restores" in raw else None
        engine = EngineRecord.from_json(json.dumps(raw["engine"]))
        ref = raw["device"]
        if not isinstance(ref, dict) or set(ref) != {"file", "id"} \
                or ref["file"] != os.path.basename(path) + ".dev" or not isinstance(ref["id"], str):
            raise ValueError(f"device: expected the file {os.path.basename(path)}.dev and its id")
        ident = int(ref["id"], 16)
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: not a usable connection state ({exc})") from exc
    device_path = path + ".dev"
    dev = devrecord.read(device_path)
    if dev.id != ident:
        raise StateError(f"{device_path}: belongs to another connection's state (id {dev.id:016x}, "
                         f"{path} names {ident:016x})")
    answer = None if dev.answer is None else SavedAnswer(*dev.answer)
    return SavedState(engine, {"requested_size": dev.requested_size, "usable_region_size": dev.usable_region_size,
                               "bitmap": dev.bitmap, "geometry": list(dev.geometry)}, answer, restores, fdnames)


def _fdnames(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) and is_ours(k)
                                            and is_ours(v) for k, v in raw.items()):
        raise ValueError(f"fds: expected roles and fd store entry names, not {raw!r}")
    if raw.get("conn", "conn") != "conn":
        raise ValueError("fds: the connection is stored as conn")
    return raw


def _load_1(raw: dict[str, Any]) -> SavedState:
    """The previous format: everything in PATH, the bitmap in hex."""
    if set(raw) != {"format", "engine", "device", "answer"}:
        raise ValueError("expected format, engine, device and answer")
    engine = EngineRecord.from_json(json.dumps(raw["engine"]))
    answer = raw["answer"]
    saved = None if answer is None else SavedAnswer(
        int(answer["ring"]), int(answer["head"]), bytes.fromhex(answer["request"]),
        bytes.fromhex(answer["response"]), int(answer["used_idx"]))
    if not isinstance(raw["device"], dict):
        raise ValueError("device: expected an object")
    return SavedState(engine, raw["device"], saved)
