"""A node's event log: decisions and observations with their reasons
(autopilot changes, members joining and failing, leadership), kept in a
bounded ring and followable."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import msgspec
import trio

log = logging.getLogger("cloudless.events")


class Event(msgspec.Struct, frozen=True):
    seq: int
    ts: float
    kind: str
    node: str
    message: str
    fields: dict[str, str] = {}


class EventLog:
    def __init__(self, capacity: int = 10_000) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._seq = 0
        self._changed = trio.Event()

    def record(self, kind: str, node: str, message: str, **fields: object) -> Event:
        self._seq += 1
        event = Event(self._seq, time.time(), kind, node, message, {k: str(v) for k, v in fields.items()})
        self._events.append(event)
        log.info(kind, extra={"fields": {"node": node, "message": message, **fields}})
        self._changed.set()
        self._changed = trio.Event()
        return event

    def last(self, n: int) -> list[Event]:
        if n <= 0:
            return []
        return list(self._events)[-n:]

    async def follow(self, after: int) -> AsyncIterator[Event]:
        """Yield events with seq > `after` as they are recorded, forever."""
        while True:
            pending = [e for e in self._events if e.seq > after]
            for event in pending:
                yield event
                after = event.seq
            if not pending:
                await self._changed.wait()
