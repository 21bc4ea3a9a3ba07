"""Raft log storage: the read interface the core uses, and its memory twin.

The core only *reads* storage (`LogStorage`). Writes leave the core as data
in a `Ready` and are made by a driver (or the simulator) through the write
side, which every implementation (memory here, RocksDB in rocks.py) offers:

    write(hard_state, entries, snapshot)   stage a batch, not durable yet
    sync()                                 make everything staged durable
    compact(index)                         drop entries <= index
    create_snapshot(index, conf, data)     record the application's snapshot

Drivers call these in the order `Ready.steps()` gives (ready.py): nothing
that promises durable state leaves before the `sync()` that makes it so.

Indexes: the storage holds a snapshot at (snapshot index, snapshot term) and
the entries after it. `first_index()` is the first entry held; the term of
`first_index() - 1` stays known (the snapshot's, or the compaction point's).
A fresh, empty storage has first_index() == 1 and last_index() == 0.

Bootstrapping a cluster: `bootstrap_log(storage, voters)` writes one
committed ADD_VOTER entry per initial voter at term 1 on every founding
member (as etcd does), so a node that joins later learns the founding
configuration from the log like any other change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cloudless.errors import CloudlessError
from cloudless.raft.messages import (
    EMPTY_SNAPSHOT,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Snapshot,
    SnapshotMeta,
    encode_conf_change,
    entry_size,
)


class StorageError(CloudlessError):
    """The Raft log storage cannot satisfy a request."""


class Compacted(StorageError):
    """The requested index is before the first available entry."""


class EntryUnavailable(StorageError):
    """The requested index is after the last entry."""


class CorruptEntry(StorageError):
    """A stored entry failed its checksum on read."""


class LogStorage(Protocol):
    """What the core reads. All indexes are Raft log indexes."""

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the ConfState of the latest snapshot."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi), cut at max_bytes but always at least one if lo < hi."""
        ...

    def term(self, index: int) -> int:
        """Term of the entry at index, valid for first_index()-1 .. last_index()."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot: ...


class WritableLogStorage(LogStorage, Protocol):
    """The write side, used by drivers and the simulator, never by the core."""

    def write(self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None = None) -> None:
        """Stage a batch (not durable until sync()).

        A snapshot is applied first: entries up to its index are dropped; the
        entries after it are kept only when the log holds the snapshot's
        (index, term), otherwise the whole log is replaced. A snapshot older
        than the current one is ignored. Then `entries` (contiguous) are
        appended; where they overlap the log, the log is truncated at the
        first new index before appending. Entries at or below the snapshot
        index are skipped.
        """
        ...

    def sync(self) -> None:
        """Make everything written so far durable."""
        ...

    def compact(self, index: int) -> None:
        """Drop entries <= index (index <= last_index; should be <= the snapshot index).

        Compacting past the snapshot index is allowed but leaves followers
        that need those entries with no way to catch up until the next
        snapshot; the simulator and node only compact up to their snapshot.
        """
        ...

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the application's state at `index` (<= last_index) as the snapshot."""
        ...


class MemoryStorage:
    """In-memory LogStorage with the write side; writes count as durable at once.

    The simulator wraps it (cloudless/testing/raft_sim.py) to model a disk
    where a crash loses whatever was written but not yet synced.
    """

    def __init__(self, conf_state: ConfState | None = None) -> None:
        self._hard_state = HardState()
        self._snapshot = EMPTY_SNAPSHOT
        # Term and index of the entry just before _entries[0]: the snapshot's,
        # or the compaction point's once compacted past the snapshot.
        self._base_index = 0
        self._base_term = 0
        self._entries: list[Entry] = []
        if conf_state is not None:
            self._snapshot = Snapshot(SnapshotMeta(0, 0, conf_state), b"")

    # -- read side ---------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.meta.conf_state

    def first_index(self) -> int:
        return self._base_index + 1

    def last_index(self) -> int:
        return self._base_index + len(self._entries)

    def term(self, index: int) -> int:
        if index < self._base_index:
            raise Compacted("entry compacted", index=index, first_index=self._base_index + 1)
        if index == self._base_index:
            return self._base_term
        if index > self.last_index():
            raise EntryUnavailable("entry not yet in log", index=index, last_index=self.last_index())
        return self._entries[index - self._base_index - 1].term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        if lo <= self._base_index:
            raise Compacted("entries compacted", lo=lo, first_index=self._base_index + 1)
        if hi > self.last_index() + 1:
            raise EntryUnavailable("entries not yet in log", hi=hi, last_index=self.last_index())
        if lo >= hi:
            return []
        offset = self._base_index + 1
        selected = self._entries[lo - offset : hi - offset]
        if max_bytes is None:
            return selected
        total = 0
        for n, entry in enumerate(selected):
            total += entry_size(entry)
            if total > max_bytes and n > 0:
                return selected[:n]
        return selected

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- write side --------------------------------------------------------

    def write(self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None = None) -> None:
        if snapshot is not None:
            self._apply_snapshot(snapshot)
        if entries:
            self._append(entries)
        if hard_state is not None:
            self._hard_state = hard_state

    def sync(self) -> None:
        pass

    def compact(self, index: int) -> None:
        if index <= self._base_index:
            return
        if index > self.last_index():
            raise EntryUnavailable("cannot compact past the last entry", index=index, last_index=self.last_index())
        term = self.term(index)
        self._entries = self._entries[index - self._base_index :]
        self._base_index, self._base_term = index, term

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        if index < self._snapshot.meta.index:
            raise StorageError("snapshot older than the current one", index=index, current=self._snapshot.meta.index)
        snapshot = Snapshot(SnapshotMeta(index, self.term(index), conf_state), data)
        self._snapshot = snapshot
        return snapshot

    def clone(self) -> MemoryStorage:
        """An independent copy (entries are immutable, so this is shallow)."""
        copy = MemoryStorage()
        copy._hard_state = self._hard_state
        copy._snapshot = self._snapshot
        copy._base_index = self._base_index
        copy._base_term = self._base_term
        copy._entries = list(self._entries)
        return copy

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        if meta.index < self._snapshot.meta.index:
            return
        if meta.index < self._base_index:
            # Already compacted past it: the log we hold is newer; keep it.
            self._snapshot = snapshot
            return
        keep: list[Entry] = []
        if self._base_index <= meta.index <= self.last_index() and self.term(meta.index) == meta.term:
            keep = self._entries[meta.index - self._base_index :]
        self._snapshot = snapshot
        self._entries = keep
        self._base_index, self._base_term = meta.index, meta.term

    def _append(self, entries: Sequence[Entry]) -> None:
        first = entries[0].index
        if first > self.last_index() + 1:
            raise StorageError("append leaves a gap in the log", first=first, last_index=self.last_index())
        if first <= self._base_index:
            entries = [e for e in entries if e.index > self._base_index]
            if not entries:
                return
            first = entries[0].index
        del self._entries[first - self._base_index - 1 :]
        self._entries.extend(entries)


def bootstrap_entries(voters: Sequence[str]) -> tuple[HardState, list[Entry]]:
    """The hard state and log every founding member starts from."""
    entries = [
        Entry(1, n, EntryKind.CONF_CHANGE, encode_conf_change(ConfChange(ConfChangeType.ADD_VOTER, voter)))
        for n, voter in enumerate(sorted(voters), start=1)
    ]
    return HardState(term=1, vote="", commit=len(entries)), entries


def bootstrap_log(storage: WritableLogStorage, voters: Sequence[str]) -> None:
    """Initialise an empty storage as a founding member of a cluster of `voters`."""
    if storage.last_index() != 0:
        raise StorageError("storage already holds a log", last_index=storage.last_index())
    hard_state, entries = bootstrap_entries(voters)
    storage.write(hard_state, entries)
    storage.sync()
