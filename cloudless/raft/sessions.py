"""Client sessions: a retried command is applied exactly once (thesis §6.3).

Each client numbers its commands 1, 2, 3... and has at most one outstanding,
so the table keeps, per client, the last sequence applied and its result. A
retry of that sequence gets the recorded result instead of applying again;
an older sequence is a stale duplicate the client has stopped waiting for.

The table lives inside the replicated state machine, so every decision in it
is a function of the log: sessions are evicted by the log index of their last
use, never by a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec


@dataclass(frozen=True)
class Fresh:
    """Not seen before: apply it, then `record` the result."""


@dataclass(frozen=True)
class Duplicate:
    """Already applied: answer with the recorded result, change nothing."""

    result: Any


@dataclass(frozen=True)
class Stale:
    """Older than the last applied command of this client: ignore it."""


class _Session(msgspec.Struct, array_like=True):
    seq: int
    result: Any
    last_index: int


class SessionTable:
    def __init__(self, max_sessions: int = 10_000) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, _Session] = {}

    def check(self, client_id: str, seq: int) -> Fresh | Duplicate | Stale:
        session = self._sessions.get(client_id)
        if session is None or seq > session.seq:
            return Fresh()
        if seq == session.seq:
            return Duplicate(session.result)
        return Stale()

    def record(self, client_id: str, seq: int, result: Any, index: int) -> None:
        """Remember `result` of command `seq`, applied at log index `index`."""
        self._sessions[client_id] = _Session(seq, result, index)
        if len(self._sessions) > self.max_sessions:
            oldest = min(self._sessions, key=lambda c: (self._sessions[c].last_index, c))
            del self._sessions[oldest]

    def __len__(self) -> int:
        return len(self._sessions)

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self._sessions)

    @classmethod
    def decode(cls, data: bytes, max_sessions: int = 10_000) -> SessionTable:
        table = cls(max_sessions)
        table._sessions = msgspec.msgpack.decode(data, type=dict[str, _Session])
        return table
