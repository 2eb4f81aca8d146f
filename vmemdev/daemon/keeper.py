"""What a successor process needs to resume the attached front-end's connection.

With ``serve --state-file PATH`` under a service manager that keeps fds
(`vmemdev hold`, or systemd with ``FileDescriptorStoreMax=``), the serving
process keeps, at every moment:

- every fd of the connection in the fd store, by role: ``conn`` (the
  vhost-user socket), ``backend``, ``kick0``/``call0``/``err0``, ``mem0``...
  (the memory table's regions, in order);
- in PATH, written atomically (a new file renamed over the old), the
  negotiated state (``vhost.snapshot``), the device model, and the answer to
  the last request that changed the device, saved before that answer is
  published in the used ring.

A successor started with those fds and that file serves the same connection
(QEMU never sees it close): the rings resume from the used index in guest
memory, so a request the dead process took but did not answer is taken
again; if the dead process had already changed the device for it, the saved
answer is given instead of deciding it again (a re-delivered PLUG gets its
ACK, not ERROR).

Not yet: the save is a file write per state-changing request (not the
shared-memory record the cost target needs); a crash between the removal of
an old fd and the store of its replacement loses that fd.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..vhost.snapshot import EngineRecord, StateError
from . import systemd

log = logging.getLogger(__name__)

FORMAT = 1
READS = (FORMAT,)  # the state formats load() accepts (an upgrade checks the new version's)


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


@dataclass(frozen=True)
class SavedState:
    engine: EngineRecord
    device: dict[str, Any]
    answer: SavedAnswer | None


@dataclass
class Persistence:
    """What a connection needs to keep itself resumable (given by the runtime)."""

    keeper: ConnectionKeeper
    version: Callable[[], object]  # changes whenever the device's state does
    record: Callable[[], dict[str, Any]]  # the device's state, for the file
    answer: SavedAnswer | None = None  # a successor's: the last answer of the dead process


class ConnectionKeeper:
    def __init__(self, path: str):
        self.path = path
        self._held: dict[str, int] = {}  # store name -> our copy of the fd stored under it
        self._engine: tuple[EngineRecord, dict[str, Any]] | None = None  # it rarely changes

    def keep_fds(self, fds: dict[str, int]) -> None:
        """Make the fd store hold exactly these. fds of one open file go once,
        under their names joined ("mem0+mem1"): the store keeps one fd per file.

        Only what changed is touched: an entry whose file is the one stored
        stays (checked against a copy we hold, as the store does, since an fd
        number may have been closed and reused), so a death during a message
        that changes no fd cannot find the store half rewritten."""
        wanted = {systemd.SHARED.join(names): fd for names, fd in systemd.group_same_files(fds)}
        for name in list(self._held):
            if name not in wanted or not systemd.same_file(self._held[name], wanted[name]):
                systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
                os.close(self._held.pop(name))
        for name, fd in wanted.items():
            if name not in self._held:
                systemd.store_fds(name, [fd])
                self._held[name] = os.dup(fd)

    def save(self, engine: EngineRecord, device: dict[str, Any], answer: SavedAnswer | None = None) -> None:
        """Atomically: a crash leaves the previous state or this one. Raises OSError."""
        if self._engine is None or self._engine[0] != engine:
            self._engine = (engine, engine.to_obj())
        text = json.dumps({"format": FORMAT, "engine": self._engine[1], "device": device,
                           "answer": None if answer is None else answer.to_json()})
        temporary = self.path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.rename(temporary, self.path)

    def forget(self) -> None:
        """The connection ended for good: nothing to resume."""
        self.keep_fds({})
        for path in (self.path, self.path + ".new"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def adopt(self, fds: dict[str, int]) -> None:
        """A successor: these are the fds the store holds for us already."""
        self._held = {systemd.SHARED.join(names): os.dup(fd) for names, fd in systemd.group_same_files(fds)}


def load(path: str) -> SavedState:
    """Read a saved state; raises StateError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
        if not isinstance(raw, dict) or set(raw) != {"format", "engine", "device", "answer"}:
            raise ValueError("expected format, engine, device and answer")
        if raw["format"] != FORMAT:
            raise ValueError(f"format {raw['format']!r}, this version reads {FORMAT}")
        engine = EngineRecord.from_json(json.dumps(raw["engine"]))
        answer = raw["answer"]
        saved = None if answer is None else SavedAnswer(
            int(answer["ring"]), int(answer["head"]), bytes.fromhex(answer["request"]),
            bytes.fromhex(answer["response"]), int(answer["used_idx"]))
        if not isinstance(raw["device"], dict):
            raise ValueError("device: expected an object")
        return SavedState(engine, raw["device"], saved)
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: not a usable connection state ({exc})") from exc
