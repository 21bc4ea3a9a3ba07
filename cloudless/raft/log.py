"""The core's view of the Raft log: persisted entries (storage) + unstable tail.

Entries the core has accepted but the driver has not yet persisted live in
the unstable tail; `Ready.entries` hands them out and `advance()` marks them
stable. Reads look at the tail first, then at storage. (etcd-io/raft log.go)
"""

from __future__ import annotations

from cloudless.errors import CloudlessError
from cloudless.raft.messages import Entry, Snapshot, entry_size
from cloudless.raft.storage import Compacted, EntryUnavailable, LogStorage


class RaftInvariantError(CloudlessError):
    """The core was asked to do something that would break a Raft safety rule."""


class RaftLog:
    def __init__(self, storage: LogStorage) -> None:
        self.storage = storage
        self.unstable_snapshot: Snapshot | None = None
        self.unstable: list[Entry] = []
        self.offset = storage.last_index() + 1  # index of unstable[0]
        self.committed = storage.first_index() - 1
        self.applied = storage.first_index() - 1

    # -- bounds ------------------------------------------------------------

    def first_index(self) -> int:
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.meta.index + 1
        return self.storage.first_index()

    def last_index(self) -> int:
        if self.unstable:
            return self.offset + len(self.unstable) - 1
        if self.unstable_snapshot is not None:
            return self.unstable_snapshot.meta.index
        return self.storage.last_index()

    def last_term(self) -> int:
        return self.term(self.last_index())

    def term(self, index: int) -> int:
        """Term at index; raises Compacted / EntryUnavailable outside the log."""
        if self.unstable_snapshot is not None and index == self.unstable_snapshot.meta.index:
            return self.unstable_snapshot.meta.term
        if self.unstable and index >= self.offset:
            if index - self.offset >= len(self.unstable):
                raise EntryUnavailable("entry not yet in log", index=index)
            return self.unstable[index - self.offset].term
        if self.unstable_snapshot is not None and index < self.unstable_snapshot.meta.index:
            raise Compacted("entry before the pending snapshot", index=index)
        if index > self.last_index():
            raise EntryUnavailable("entry not yet in log", index=index)
        return self.storage.term(index)

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except (Compacted, EntryUnavailable):
            return False

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft paper §5.4.1: the candidate's log is at least as up to date as ours."""
        our_term = self.last_term()
        return last_term > our_term or (last_term == our_term and last_index >= self.last_index())

    # -- reading entries ---------------------------------------------------

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries [lo, hi); raises Compacted when lo is before first_index()."""
        if lo < self.first_index():
            raise Compacted("entries compacted", lo=lo, first_index=self.first_index())
        if hi > self.last_index() + 1:
            raise EntryUnavailable("entries beyond the log", hi=hi, last_index=self.last_index())
        if lo >= hi:
            return []
        out: list[Entry] = []
        if lo < self.offset:
            out = self.storage.entries(lo, min(hi, self.offset), max_bytes)
            if len(out) < min(hi, self.offset) - lo:
                return out  # cut by max_bytes
        if hi > self.offset:
            start = max(lo, self.offset)
            tail = self.unstable[start - self.offset : hi - self.offset]
            if max_bytes is None:
                out.extend(tail)
            else:
                total = sum(entry_size(e) for e in out)
                for entry in tail:
                    total += entry_size(entry)
                    if total > max_bytes and out:
                        break
                    out.append(entry)
        return out

    def next_committed(self) -> list[Entry]:
        """Committed entries not yet handed to the application."""
        lo = max(self.applied + 1, self.first_index())
        if self.committed + 1 > lo:
            return self.entries(lo, self.committed + 1)
        return []

    def has_next_committed(self) -> bool:
        return self.committed + 1 > max(self.applied + 1, self.first_index())

    # -- changing the log --------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        """Append, truncating any suffix from entries[0].index (the caller checked commit)."""
        if not entries:
            return
        after = entries[0].index
        if after <= self.committed:
            raise RaftInvariantError("truncating committed entries", index=after, committed=self.committed)
        if after == self.offset + len(self.unstable):
            self.unstable.extend(entries)
        elif after <= self.offset:
            # Replaces persisted entries too; storage.write truncates on persist.
            self.offset = after
            self.unstable = list(entries)
        else:
            del self.unstable[after - self.offset :]
            self.unstable.extend(entries)

    def find_conflict(self, entries: list[Entry] | tuple[Entry, ...]) -> int:
        """Index of the first entry that is new or conflicts with ours; 0 if none."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= index whose term is <= term (fast back-off hint)."""
        while index > 0:
            try:
                our = self.term(index)
            except (Compacted, EntryUnavailable):
                return index
            if our <= term:
                return index
            index -= 1
        return 0

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise RaftInvariantError("commit beyond the log", commit=index, last_index=self.last_index())
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Raft paper §5.4.2: only an entry of the current term commits by counting."""
        if index > self.committed and self.match_term(index, term):
            self.committed = index
            return True
        return False

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.meta.index
        self.unstable_snapshot = snapshot
        self.unstable = []
        self.offset = snapshot.meta.index + 1

    # -- after the driver persisted / applied --------------------------------

    def stable_to(self, index: int, term: int) -> None:
        if self.unstable and index >= self.offset and self.match_term(index, term):
            drop = index - self.offset + 1
            if drop <= len(self.unstable) and self.unstable[drop - 1].term == term:
                self.unstable = self.unstable[drop:]
                self.offset = index + 1

    def stable_snapshot_to(self, index: int) -> None:
        if self.unstable_snapshot is not None and self.unstable_snapshot.meta.index == index:
            self.unstable_snapshot = None

    def applied_to(self, index: int) -> None:
        if index > self.applied:
            self.applied = index
