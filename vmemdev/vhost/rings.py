"""One virtqueue as the front-end configured it, and its lifecycle.

The configuration (size, addresses, base) arrives in separate messages and
may be re-sent; the ``SplitQueue`` view over guest memory is rebuilt from it
after every memory-table change. Whether the ring is served is a state in
an explicit table (``TRANSITIONS``), not a set of booleans.

The kick, call and err eventfds are not here: the daemon owns every fd it
waits on or writes to. This module holds numbers and shared-memory views only.
"""

from __future__ import annotations

import enum
import logging

from ..errors import PeerError
from ..protocol.vhost_user import VringAddr
from ..protocol.virtqueue import SplitQueue, avail_ring_size, desc_table_size, used_ring_size
from .interfaces import GuestMemory

log = logging.getLogger(__name__)


class RingState(enum.Enum):
    STOPPED = "stopped"  # no kick fd, not enabled (a fresh or reset ring)
    STOPPED_ENABLED = "stopped, enabled"  # SET_VRING_ENABLE 1 came before the kick fd
    STARTED = "started"  # kick fd set, not enabled yet
    RUNNING = "running"  # started and enabled: requests are served
    BROKEN = "broken"  # the driver's ring is inconsistent: idle until stopped and restarted


class RingEvent(enum.Enum):
    KICK = "SET_VRING_KICK"
    ENABLE = "SET_VRING_ENABLE 1"
    DISABLE = "SET_VRING_ENABLE 0"
    STOP = "GET_VRING_BASE"
    RESET = "reset"  # RESET_OWNER, RESET_DEVICE
    BREAK = "ring inconsistent"


S, E = RingState, RingEvent
# (state, event) -> next state. A pair that is missing leaves the state as it is.
TRANSITIONS: dict[tuple[RingState, RingEvent], RingState] = {
    (S.STOPPED, E.KICK): S.STARTED,
    (S.STOPPED, E.ENABLE): S.STOPPED_ENABLED,
    (S.STOPPED_ENABLED, E.KICK): S.RUNNING,
    (S.STOPPED_ENABLED, E.DISABLE): S.STOPPED,
    (S.STARTED, E.ENABLE): S.RUNNING,
    (S.STARTED, E.STOP): S.STOPPED,
    (S.RUNNING, E.DISABLE): S.STARTED,
    (S.RUNNING, E.STOP): S.STOPPED_ENABLED,
    (S.RUNNING, E.BREAK): S.BROKEN,
    # QEMU's recovery from a broken ring: stop it, then start it again.
    (S.BROKEN, E.STOP): S.STOPPED,
    **{(state, E.RESET): S.STOPPED for state in RingState},
}
del S, E


class Ring:
    def __init__(self, index: int):
        self.index = index
        self.state = RingState.STOPPED
        self.num = 0
        self.addr: VringAddr | None = None
        self.last_avail_idx = 0
        self.queue: SplitQueue | None = None
        self.broken_reason: str | None = None

    def apply(self, event: RingEvent) -> RingState:
        self.state = TRANSITIONS.get((self.state, event), self.state)
        return self.state

    def reset(self) -> None:
        """Forget the configuration (RESET_OWNER/RESET_DEVICE)."""
        self.apply(RingEvent.RESET)
        self.num = 0
        self.addr = None
        self.last_avail_idx = 0
        self.queue = None
        self.broken_reason = None

    @property
    def ready(self) -> bool:
        return self.state is RingState.RUNNING and self.queue is not None

    def map(self, memory: GuestMemory) -> PeerError | None:
        """(Re)build the queue view from the configured addresses; why not, if it cannot."""
        self.unmap()
        if self.addr is None or self.num == 0:
            return None
        a = self.addr
        try:
            desc = memory.uva_area(a.desc_user_addr, desc_table_size(self.num))
            avail = memory.uva_area(a.avail_user_addr, avail_ring_size(self.num))
            used = memory.uva_area(a.used_user_addr, used_ring_size(self.num))
            access = memory.ring_access
            used_idx = access.load_acquire_u16(used.address + 2)  # resume where the guest sees us
            self.queue = SplitQueue(self.num, desc, avail, used, access, self.last_avail_idx, used_idx)
        except PeerError as exc:  # GuestMemoryError included
            log.error("vring %d cannot be mapped: %s", self.index, exc)
            return exc
        return None

    def unmap(self) -> None:
        if self.queue is not None:
            # Keep our position across remaps; SET_VRING_BASE sets it otherwise.
            self.last_avail_idx = self.queue.last_avail_idx
        self.queue = None
