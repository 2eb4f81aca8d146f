"""One virtqueue as the front-end configured it, and its eventfds.

The configuration (size, addresses, base) arrives in separate messages and
may be re-sent; the ``SplitQueue`` view over guest memory is rebuilt from it
after every memory-table change.
"""

from __future__ import annotations

import logging
import os

import trio

from ..errors import GuestMemoryError, PeerProtocolError
from ..host.memory import GuestMemory
from ..protocol.vhost_user import VringAddr
from ..protocol.virtqueue import SplitQueue, avail_ring_size, desc_table_size, used_ring_size

log = logging.getLogger(__name__)


def close_fd(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class Vring:
    def __init__(self, index: int):
        self.index = index
        self.wakeup = trio.Event()
        self.cancel_scope: trio.CancelScope | None = None  # the kick watcher
        self.kick_fd = self.call_fd = self.err_fd = None
        self.reset()

    def reset(self) -> None:
        """Forget the configuration (RESET_OWNER/RESET_DEVICE); closes the fds."""
        self.close()
        self.num = 0
        self.addr: VringAddr | None = None
        self.last_avail_idx = 0
        self.started = False  # has a kick fd and was not stopped by GET_VRING_BASE
        self.enabled = False  # SET_VRING_ENABLE (rings start disabled with PROTOCOL_FEATURES)
        self.queue: SplitQueue | None = None
        self.broken: str | None = None  # why processing stopped until the next start

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and self.queue is not None and self.broken is None

    def map(self, memory: GuestMemory | None) -> None:
        """(Re)build the queue view from the configured addresses."""
        if self.queue is not None:
            # Keep our position across remaps; SET_VRING_BASE sets it otherwise.
            self.last_avail_idx = self.queue.last_avail_idx
        self.queue = None
        if memory is None or self.addr is None or self.num == 0:
            return
        a = self.addr
        try:
            desc = memory.uva_area(a.desc_user_addr, desc_table_size(self.num))
            avail = memory.uva_area(a.avail_user_addr, avail_ring_size(self.num))
            used = memory.uva_area(a.used_user_addr, used_ring_size(self.num))
            used_idx = int.from_bytes(used[0][used[1] + 2 : used[1] + 4], "little")
            self.queue = SplitQueue(self.num, desc, avail, used, self.last_avail_idx, used_idx)
        except (GuestMemoryError, PeerProtocolError) as exc:
            log.error("vring %d cannot be mapped: %s", self.index, exc)

    def unmap(self) -> None:
        if self.queue is not None:
            self.last_avail_idx = self.queue.last_avail_idx
        self.queue = None

    def poke(self) -> None:
        """Wake the ring's worker (a kick, an enable, a remap)."""
        self.wakeup.set()

    def signal_used(self) -> None:
        if self.call_fd is None:
            return
        try:
            os.eventfd_write(self.call_fd, 1)
        except OSError as exc:
            log.error("vring %d: cannot signal the call eventfd: %s", self.index, exc)

    def close(self) -> None:
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()
            self.cancel_scope = None
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            close_fd(fd)
        self.kick_fd = self.call_fd = self.err_fd = None
        self.queue = None
