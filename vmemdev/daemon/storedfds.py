"""Which fd store entry holds each of the connection's fds.

The service manager's fd store (systemd, or `vmemdev hold`) keeps fds by
name, one fd per open file, and cannot rename or replace an entry. So that
a death at any instant finds every fd the state file needs, a change goes
in three steps (``keeper.ConnectionKeeper.save``):

1. ``stage``: an fd of a file not stored yet goes in under a name never used
   before ("kick0@7"); an fd of a stored file reuses that entry;
2. the state file is written, naming the entry of each role (role -> name);
3. ``commit``: entries no role names any more are removed.

The old state file names entries that are all still there until step 2,
the new one entries that are all there from step 1. The vhost-user
connection itself is stored as "conn" after the first state file exists,
so a "conn" entry always has a state beside it.

Entries of a state before format 3 carry the role's name ("mem0+mem1",
"kick0"); they are adopted under it and replaced as above.
"""

from __future__ import annotations

import logging
import os
import re

from . import systemd

log = logging.getLogger(__name__)

CONN = "conn"
# Names this module stores: generation names and the format-2 role names.
OURS = re.compile(r"(conn|backend|(kick|call|err|mem)\d+)(\+(backend|(kick|call|err|mem)\d+))*(@\d+)?")


def is_ours(name: str) -> bool:
    return OURS.fullmatch(name) is not None


class StoredFds:
    def __init__(self) -> None:
        self.held: dict[str, int] = {}  # store name -> our copy of the fd stored under it
        self.roles: dict[str, str] = {}  # role -> store name
        self._generation = 0
        self._conn: int | None = None  # the connection, stored by commit()

    def stage(self, fds: dict[str, int]) -> None:
        """Name an entry for each role of ``fds``, storing the files not held yet
        (the connection last, in ``commit``)."""
        roles: dict[str, str] = {}
        for role, fd in fds.items():
            if role == CONN:
                roles[role] = CONN
                continue
            name = self.roles.get(role)
            if name is None or not systemd.same_file(self.held[name], fd):
                name = next((n for n, copy in self.held.items() if n != CONN and systemd.same_file(copy, fd)), None)
            if name is None:
                self._generation += 1
                name = f"{role}@{self._generation}"
                systemd.store_fds(name, [fd])
                self.held[name] = os.dup(fd)
            roles[role] = name
        self._conn = fds.get(CONN)
        self.roles = roles

    def commit(self) -> None:
        """After the state file names ``roles``: store the connection if it is
        new, remove the entries nothing names."""
        if CONN in self.roles and CONN not in self.held and self._conn is not None:
            systemd.store_fds(CONN, [self._conn])
            self.held[CONN] = os.dup(self._conn)
        named = set(self.roles.values())
        for name in [n for n in self.held if n not in named]:
            self._remove(name)

    def adopt(self, store: dict[str, int], roles: dict[str, str]) -> None:
        """A successor: ``store`` is what the fd store gave us, ``roles`` what the
        state file names. Our entries nobody names (a death between steps 1
        and 3) are removed."""
        self.roles = dict(roles)
        named = set(roles.values())
        for name, fd in store.items():
            if name in named:
                self.held[name] = os.dup(fd)
            elif is_ours(name):
                log.info("fd store entry %s is named by no state: removed", name)
                systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
                os.close(fd)
            else:
                continue
            generation = name.rpartition("@")[2]
            if generation.isdigit():
                self._generation = max(self._generation, int(generation))

    def resolve(self, store: dict[str, int]) -> dict[str, int]:
        """role -> fd from what the fd store gave us, for the ``roles`` adopted;
        roles that share an entry get a dup each (each closes its own)."""
        out: dict[str, int] = {}
        given: set[str] = set()
        for role, name in self.roles.items():
            out[role] = os.dup(store[name]) if name in given else store[name]
            given.add(name)
        return out

    def entries(self) -> dict[str, int]:
        """Our copy of every entry, by store name (what an upgrade hands over)."""
        return dict(self.held)

    def forget(self) -> None:
        for name in list(self.held):
            self._remove(name)
        self.roles = {}

    def _remove(self, name: str) -> None:
        systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        os.close(self.held.pop(name))
