"""The member table: what this member believes about every other member.

Kept lean on purpose: a simulation holds n² of these rows (25 million at
5,000 members), so a row is a gc-free msgspec Struct whose strings and
metadata are shared, never copied per observer.
"""

from __future__ import annotations

import random
import sys
from enum import IntEnum

import msgspec

from cloudless.gossip.metadata import Metadata


class MemberState(IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


ALIVE = MemberState.ALIVE
SUSPECT = MemberState.SUSPECT
DEAD = MemberState.DEAD
LEFT = MemberState.LEFT


class Member(msgspec.Struct, gc=False):
    name: str
    addr: str
    incarnation: int
    state: int
    state_change: float
    meta_version: int
    meta: Metadata

    @property
    def is_live(self) -> bool:
        return self.state <= SUSPECT


class MemberTable:
    """Rows by name, plus the randomized round-robin probe order (SWIM §4.3)."""

    __slots__ = ("_cursor", "_order", "gone", "live_count", "rows")

    def __init__(self) -> None:
        self.rows: dict[str, Member] = {}
        self._order: list[str] = []
        self._cursor = 0
        self.live_count = 0  # members (ourselves included) that are alive or suspect
        # Dead and left members in the order they went (a dict: deterministic order).
        self.gone: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, name: str) -> Member | None:
        return self.rows.get(name)

    def add(self, member: Member, rng: random.Random) -> None:
        member.name = sys.intern(member.name)
        member.addr = sys.intern(member.addr)
        self.rows[member.name] = member
        # A newcomer goes to a random place in the order, so it is probed within
        # one round on average instead of waiting for the next shuffle.
        self._order.insert(rng.randint(0, len(self._order)), member.name)
        if member.state <= SUSPECT:
            self.live_count += 1
        else:
            self.gone[member.name] = None

    def add_many(self, members: list[Member], rng: random.Random) -> None:
        """Bulk insert (warm start): one shuffle instead of n random inserts."""
        rows = self.rows
        for m in members:
            rows[m.name] = m
            self._order.append(m.name)
            if m.state <= SUSPECT:
                self.live_count += 1
        rng.shuffle(self._order)

    def set_state(self, member: Member, state: int, now: float) -> None:
        was_live = member.state <= SUSPECT
        member.state = state
        member.state_change = now
        is_live = state <= SUSPECT
        if was_live != is_live:
            self.live_count += 1 if is_live else -1
            if is_live:
                self.gone.pop(member.name, None)
            else:
                self.gone[member.name] = None

    def next_probe_target(self, rng: random.Random, self_name: str) -> Member | None:
        """Next live member in round-robin order; reshuffles at the end of a round."""
        order = self._order
        for _ in range(2):
            while self._cursor < len(order):
                name = order[self._cursor]
                self._cursor += 1
                m = self.rows.get(name)
                if m is not None and m.state <= SUSPECT and name != self_name:
                    return m
            self._cursor = 0
            # Drop reaped names while we are here, then reshuffle.
            order[:] = [n for n in order if n in self.rows]
            rng.shuffle(order)
        return None

    def random_members(
        self, rng: random.Random, k: int, exclude: tuple[str, ...], dead_since: float | None = None
    ) -> list[Member]:
        """Up to k distinct random members that are live (or died after
        `dead_since`, so news of their death still reaches everyone)."""
        order = self._order
        size = len(order)
        picked: list[Member] = []
        if size == 0:
            return picked
        if size <= 8 * k:
            # Small tables: sample exactly instead of hoping random draws hit.
            cands = [self.rows[n] for n in order if n not in exclude and n in self.rows]
            cands = [
                m
                for m in cands
                if m.state <= SUSPECT or (dead_since is not None and m.state == DEAD and m.state_change > dead_since)
            ]
            return rng.sample(cands, min(k, len(cands)))
        seen: set[str] = set()
        for _ in range(3 * k + 3):
            name = order[int(rng.random() * size)]
            if name in seen or name in exclude:
                continue
            seen.add(name)
            m = self.rows.get(name)
            if m is None:
                continue
            if m.state <= SUSPECT or (dead_since is not None and m.state == DEAD and m.state_change > dead_since):
                picked.append(m)
                if len(picked) >= k:
                    break
        return picked

    def random_dead(self, rng: random.Random) -> Member | None:
        dead = [self.rows[n] for n in self.gone if self.rows[n].state == DEAD]
        return rng.choice(dead) if dead else None

    def reap(self, before: float) -> list[str]:
        """Forget dead and left members whose tombstones are older than `before`."""
        reaped = [n for n in self.gone if self.rows[n].state_change < before]
        for n in reaped:
            del self.rows[n]
            del self.gone[n]
        return reaped
