"""Asynchronous events for operators, QMP-style.

The device publishes; each control-socket client subscribes with a bounded
queue. Publishing never blocks: a subscriber whose queue is full is marked
overrun and dropped by its connection, so a client that stops reading can
never hold up the device. A short history lets ``events`` show what
happened just before a client connected.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

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
    def __init__(self, bus: "EventBus", limit: int):
        self._bus = bus
        self._limit = limit
        self.queue: collections.deque[Event] = collections.deque()
        self.overrun = False
        self._wakeup = None

    def push(self, event: Event) -> None:
        if len(self.queue) >= self._limit:
            self.overrun = True
        else:
            self.queue.append(event)
        if self._wakeup is not None:
            self._wakeup.set()

    async def next(self) -> Event | None:
        """The next event; None once the subscriber fell too far behind."""
        import trio

        while not self.queue and not self.overrun:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        if self.overrun:
            return None
        return self.queue.popleft()

    def close(self) -> None:
        self._bus._subscribers.discard(self)


class EventBus:
    def __init__(self):
        self._subscribers: set[Subscription] = set()
        self.history: collections.deque[Event] = collections.deque(maxlen=HISTORY)

    def publish(self, name: str, **data) -> Event:
        event = Event(name, data)
        self.history.append(event)
        for sub in list(self._subscribers):
            sub.push(event)
        return event

    def subscribe(self, limit: int = QUEUE_LIMIT) -> Subscription:
        sub = Subscription(self, limit)
        self._subscribers.add(sub)
        return sub
