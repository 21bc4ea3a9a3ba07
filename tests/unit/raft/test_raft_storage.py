"""MemoryStorage honours the LogStorage contract the core and the RocksDB twin share."""

import pytest

from cloudless.raft.messages import (
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Snapshot,
    SnapshotMeta,
    entry_size,
)
from cloudless.raft.storage import Compacted, EntryUnavailable, MemoryStorage, StorageError


def ents(lo, hi, term=1, size=0):
    return [Entry(term, i, EntryKind.NORMAL, b"x" * size) for i in range(lo, hi)]


def test_fresh_storage_is_empty_with_index_zero_term_zero():
    s = MemoryStorage()
    assert s.first_index() == 1
    assert s.last_index() == 0
    assert s.term(0) == 0
    assert s.entries(1, 1) == []
    assert s.initial_state() == (HardState(), ConfState())


def test_bootstrap_conf_state_is_reported_by_initial_state():
    conf = ConfState(voters=("a", "b", "c"))
    s = MemoryStorage(conf_state=conf)
    assert s.initial_state() == (HardState(), conf)
    assert s.snapshot().meta == SnapshotMeta(0, 0, conf)


def test_write_appends_and_persists_hard_state():
    s = MemoryStorage()
    s.write(HardState(term=2, vote="a", commit=1), ents(1, 4))
    s.sync()
    assert s.last_index() == 3
    assert [e.index for e in s.entries(1, 4)] == [1, 2, 3]
    assert s.initial_state()[0] == HardState(term=2, vote="a", commit=1)


def test_overlapping_write_truncates_the_conflicting_suffix():
    s = MemoryStorage()
    s.write(None, ents(1, 6, term=1))
    s.write(None, ents(3, 5, term=2))
    assert s.last_index() == 4
    assert [e.term for e in s.entries(1, 5)] == [1, 1, 2, 2]


def test_write_with_gap_is_refused():
    s = MemoryStorage()
    s.write(None, ents(1, 3))
    with pytest.raises(StorageError):
        s.write(None, ents(5, 6))


def test_entries_out_of_range_raise_compacted_and_unavailable():
    s = MemoryStorage()
    s.write(None, ents(1, 11))
    s.compact(4)
    assert s.first_index() == 5
    assert s.term(4) == 1
    with pytest.raises(Compacted):
        s.entries(4, 6)
    with pytest.raises(Compacted):
        s.term(3)
    with pytest.raises(EntryUnavailable):
        s.entries(5, 12)
    with pytest.raises(EntryUnavailable):
        s.term(11)


def test_max_bytes_cuts_batches_but_returns_at_least_one_entry():
    s = MemoryStorage()
    s.write(None, ents(1, 11, size=100))
    one = entry_size(s.entries(1, 2)[0])
    assert len(s.entries(1, 11, max_bytes=one * 3)) == 3
    assert len(s.entries(1, 11, max_bytes=1)) == 1
    assert len(s.entries(1, 11)) == 10


def test_create_snapshot_then_compact_keeps_term_of_snapshot_index():
    s = MemoryStorage(ConfState(voters=("a",)))
    s.write(None, ents(1, 4, term=1) + ents(4, 8, term=3))
    snap = s.create_snapshot(5, ConfState(voters=("a", "b")), b"state")
    assert snap.meta == SnapshotMeta(5, 3, ConfState(voters=("a", "b")))
    s.compact(5)
    assert s.first_index() == 6
    assert s.term(5) == 3
    assert s.snapshot() == snap
    assert s.initial_state()[1] == ConfState(voters=("a", "b"))
    with pytest.raises(StorageError):
        s.create_snapshot(4, ConfState(), b"older")


def test_installing_a_snapshot_that_conflicts_replaces_the_whole_log():
    s = MemoryStorage()
    s.write(None, ents(1, 10, term=1))
    snap = Snapshot(SnapshotMeta(5, 2, ConfState(voters=("a",))), b"s")
    s.write(None, [], snap)
    assert s.first_index() == 6
    assert s.last_index() == 5
    assert s.term(5) == 2


def test_installing_a_snapshot_that_matches_keeps_the_following_entries():
    s = MemoryStorage()
    s.write(None, ents(1, 10, term=1))
    s.write(None, [], Snapshot(SnapshotMeta(5, 1, ConfState()), b"s"))
    assert s.first_index() == 6
    assert s.last_index() == 9


def test_installing_an_older_snapshot_is_ignored():
    s = MemoryStorage()
    s.write(None, [], Snapshot(SnapshotMeta(5, 2, ConfState()), b"new"))
    s.write(None, [], Snapshot(SnapshotMeta(3, 1, ConfState()), b"old"))
    assert s.snapshot().data == b"new"


def test_snapshot_then_entries_in_one_batch():
    s = MemoryStorage()
    snap = Snapshot(SnapshotMeta(5, 2, ConfState()), b"s")
    s.write(HardState(2, "", 5), ents(6, 8, term=2), snap)
    assert (s.first_index(), s.last_index()) == (6, 7)
    # entries at or below the snapshot index are skipped
    s.write(None, ents(4, 7, term=2))
    assert (s.first_index(), s.last_index()) == (6, 6)


def test_clone_is_independent():
    s = MemoryStorage()
    s.write(None, ents(1, 4))
    c = s.clone()
    s.write(None, ents(4, 6))
    assert c.last_index() == 3
    assert s.last_index() == 5
