"""Asynchronous events for operators, QMP-style.

The device publishes; each control-socket client subscribes with a bounded
queue. Publishing never blocks: when a subscriber's queue is full, newer
events are dropped for it and it later receives one EVENTS_LOST event with
the count, so a client that stops reading can never hold up the device. A
short history lets ``events`` show what happened just before a client
connected. The device publishes from a connection's thread as well as from
Trio: a subscriber is woken through Trio's token from another thread.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import trio

HISTORY = 256
QUEUE_LIMIT = 1024


@dataclass(frozen=True)
class Event:
    name: str
    data: dict
    timestamp: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        seconds = int(self.timestamp)
        return {
            "event": self.name,
            "data": self.data,
            "timestamp": {"seconds": seconds, "microseconds": int((self.timestamp - seconds) * 1e6)},
        }


class Subscription:
    def __init__(self, bus: EventBus, limit: int):
        self._bus = bus
        self._limit = limit
        self.queue: collections.deque[Event] = collections.deque()
        self.lost = 0  # events dropped since the queue was last full
        self._wakeup: trio.Event | None = None
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()

    def push(self, event: Event) -> None:
        if len(self.queue) >= self._limit:
            self.lost += 1
        else:
            self.queue.append(event)
        if threading.get_ident() == self._trio_thread:
            self._wake()
        else:
            try:
                self._token.run_sync_soon(self._wake)
            except trio.RunFinishedError:
                pass

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def next(self) -> Event:
        """The next event; an EVENTS_LOST event tells a slow reader what it missed."""
        while not self.queue and not self.lost:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        if self.queue:
            return self.queue.popleft()
        lost, self.lost = self.lost, 0
        return Event("EVENTS_LOST", {"count": lost})

    def close(self) -> None:
        self._bus._subscribers.discard(self)


class EventBus:
    def __init__(self):
        self._subscribers: set[Subscription] = set()
        self.history: collections.deque[Event] = collections.deque(maxlen=HISTORY)

    def publish(self, event_name: str, /, **data) -> Event:
        event = Event(event_name, data)
        self.history.append(event)
        for sub in list(self._subscribers):
            sub.push(event)
        return event

    def subscribe(self, limit: int = QUEUE_LIMIT) -> Subscription:
        sub = Subscription(self, limit)
        self._subscribers.add(sub)
        return sub
