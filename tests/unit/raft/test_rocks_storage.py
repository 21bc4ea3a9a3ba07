"""RocksStorage: the LogStorage contract (same answers as MemoryStorage), checksums, format versions."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from cloudless.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from cloudless.raft.rocks import RocksStorage, UnsupportedFormat, index_key
from cloudless.raft.storage import Compacted, CorruptEntry, EntryUnavailable, MemoryStorage, StorageError


def ents(term, lo, hi, tag=b""):
    return [Entry(term, i, 0, tag + b"%d" % i) for i in range(lo, hi)]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "raft"


def raw_db(path):
    cfs = {name: Options(raw_mode=True) for name in ("raft_log", "raft_meta", "raft_snap")}
    return Rdict(str(path), options=Options(raw_mode=True), column_families=cfs)


def same_view(rocks, mem):
    assert rocks.first_index() == mem.first_index()
    assert rocks.last_index() == mem.last_index()
    assert rocks.initial_state() == mem.initial_state()
    assert rocks.snapshot() == mem.snapshot()
    for i in range(mem.first_index() - 1, mem.last_index() + 1):
        assert rocks.term(i) == mem.term(i), i
    lo, hi = mem.first_index(), mem.last_index() + 1
    assert rocks.entries(lo, hi) == mem.entries(lo, hi)
    for limit in (0, 30, 100):
        assert rocks.entries(lo, hi, limit) == mem.entries(lo, hi, limit)
    for probe in (mem.first_index() - 2, mem.last_index() + 1):
        if probe < 0:
            continue
        for fn in ("term", "entries"):
            args = (probe,) if fn == "term" else (probe, probe + 1)
            try:
                expected = type(None), getattr(mem, fn)(*args)
            except StorageError as exc:
                expected = type(exc), None
            try:
                got = type(None), getattr(rocks, fn)(*args)
            except StorageError as exc:
                got = type(exc), None
            assert got == expected, (fn, probe)


def random_op(rng: random.Random, mem: MemoryStorage, term: list[int]):
    first, last = mem.first_index(), mem.last_index()
    snap_index = mem.snapshot().meta.index
    kind = rng.choices(["append", "conflict", "hard", "compact", "create_snap", "install"], [5, 2, 2, 1, 1, 1])[0]
    if kind == "append":
        return (
            "write",
            HardState(term[0], "n1", rng.randint(0, last)),
            ents(term[0], last + 1, last + 1 + rng.randint(1, 8)),
            None,
        )
    if kind == "conflict":
        term[0] += 1
        start = rng.randint(max(1, first - 2, snap_index + 1), max(last + 1, snap_index + 1))
        return ("write", None, ents(term[0], start, start + rng.randint(1, 5), b"c"), None)
    if kind == "hard":
        term[0] += rng.randint(0, 1)
        return ("write", HardState(term[0], rng.choice(["", "n1", "n2"]), rng.randint(0, last)), [], None)
    if kind == "compact":
        return ("compact", rng.randint(first - 1, last))
    if kind == "create_snap":
        lo = max(snap_index, first - 1)
        if lo > last:
            return ("compact", first - 1)
        return (
            "create_snapshot",
            rng.randint(lo, last),
            ConfState(voters=("n1", "n2")),
            rng.randbytes(rng.randint(0, 50)),
        )
    index = rng.randint(max(0, snap_index - 1), last + 4)
    matching = first - 1 <= index <= last and rng.random() < 0.5
    t = mem.term(index) if matching else term[0]
    snap = Snapshot(SnapshotMeta(index, t, ConfState(voters=("n1",), learners=("n3",))), rng.randbytes(20))
    return ("write", None, [], snap)


def apply(storage, op):
    if op[0] == "write":
        storage.write(*op[1:])
    elif op[0] == "compact":
        storage.compact(op[1])
    else:
        storage.create_snapshot(*op[1:])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(seed=st.integers(0, 2**32))
def test_rocks_storage_answers_like_memory_storage_before_and_after_reopen(tmp_path_factory, seed):
    rng = random.Random(seed)
    path = tmp_path_factory.mktemp("rocks")
    mem, term = MemoryStorage(), [1]
    with RocksStorage(path) as rocks:
        for _ in range(30):
            op = random_op(rng, mem, term)
            apply(mem, op)
            apply(rocks, op)
            same_view(rocks, mem)
        rocks.sync()
    with RocksStorage(path) as rocks:
        same_view(rocks, mem)


@pytest.mark.parametrize("seed", range(20))
def test_a_small_tail_cache_evicts_the_oldest_entries_and_answers_stay_the_same(tmp_path, monkeypatch, seed):
    # The cache holds 4096 entries; the property test above never fills it.
    monkeypatch.setattr("cloudless.raft.rocks._TAIL_CACHE", 6)
    rng = random.Random(seed)
    mem, term = MemoryStorage(), [1]
    with RocksStorage(tmp_path / "raft") as rocks:
        for _ in range(60):
            op = random_op(rng, mem, term)
            apply(mem, op)
            apply(rocks, op)
            same_view(rocks, mem)
            cached = list(rocks._tail)
            assert len(cached) <= 6
            assert cached == sorted(cached)
            if cached:  # the newest entries are the ones kept
                assert cached[-1] == rocks.last_index()
                assert cached == list(range(cached[0], cached[-1] + 1))


def test_fresh_storage_is_empty(path):
    with RocksStorage(path) as s:
        assert (s.first_index(), s.last_index(), s.term(0)) == (1, 0, 0)
        assert s.initial_state() == (HardState(), ConfState())
        assert s.entries(1, 1) == []


def test_conflicting_suffix_is_truncated_before_append(path):
    with RocksStorage(path) as s:
        s.write(HardState(1), ents(1, 1, 11))
        s.write(HardState(2), ents(2, 4, 6, b"x"))
        assert s.last_index() == 5
        assert [e.term for e in s.entries(1, 6)] == [1, 1, 1, 2, 2]
        with pytest.raises(EntryUnavailable):
            s.term(6)
        s.sync()
    with RocksStorage(path) as s:  # the truncated entries 6..10 do not come back
        assert s.last_index() == 5 and s.entries(4, 6) == ents(2, 4, 6, b"x")


def test_append_with_a_gap_is_refused(path):
    with RocksStorage(path) as s:
        s.write(None, ents(1, 1, 3))
        with pytest.raises(StorageError):
            s.write(None, ents(1, 5, 6))
        assert s.last_index() == 2


def test_compaction_keeps_the_term_of_the_compaction_point(path):
    with RocksStorage(path) as s:
        s.write(None, ents(1, 1, 5) + ents(2, 5, 10))
        s.compact(6)
        assert s.first_index() == 7 and s.term(6) == 2
        with pytest.raises(Compacted):
            s.entries(6, 8)
        with pytest.raises(Compacted):
            s.term(5)
        with pytest.raises(EntryUnavailable):
            s.compact(12)
        s.sync()
    with RocksStorage(path) as s:
        assert s.first_index() == 7 and s.term(6) == 2 and s.entries(7, 10) == ents(2, 7, 10)


def test_snapshot_install_keeps_the_matching_log_suffix(path):
    with RocksStorage(path) as s:
        s.write(None, ents(1, 1, 10))
        snap = Snapshot(SnapshotMeta(5, 1, ConfState(voters=("a",))), b"state")
        s.write(HardState(1, "", 5), [], snap)
        assert (s.first_index(), s.last_index(), s.term(5)) == (6, 9, 1)
        assert s.snapshot() == snap and s.initial_state()[1] == ConfState(voters=("a",))


def test_snapshot_install_replaces_a_log_that_does_not_match(path):
    with RocksStorage(path) as s:
        s.write(None, ents(1, 1, 10))
        s.write(None, [], Snapshot(SnapshotMeta(7, 3, ConfState()), b"s"))
        assert (s.first_index(), s.last_index(), s.term(7)) == (8, 7, 3)
        s.write(None, [], Snapshot(SnapshotMeta(4, 1, ConfState()), b"old"))  # older: ignored
        assert s.snapshot().data == b"s"
        s.write(None, ents(3, 8, 9))
        s.sync()
    with RocksStorage(path) as s:
        assert (s.first_index(), s.last_index(), s.snapshot().meta.index) == (8, 8, 7)


def test_flipped_byte_in_an_entry_is_detected_and_names_the_index(path):
    with RocksStorage(path) as s:
        s.write(HardState(1), ents(1, 1, 10))
        s.sync()
    db = raw_db(path)
    log = db.get_column_family("raft_log")
    record = bytearray(log[index_key(5)])
    record[-1] ^= 0x01
    log[index_key(5)] = bytes(record)
    del log
    db.close()
    del db
    with RocksStorage(path) as s:
        assert s.entries(1, 5) == ents(1, 1, 5)
        with pytest.raises(CorruptEntry) as exc:
            s.entries(1, 10)
        assert exc.value.context["index"] == 5
        with pytest.raises(CorruptEntry):
            s.term(5)


def test_entry_copied_under_another_index_is_detected(path):
    with RocksStorage(path) as s:
        s.write(HardState(1), ents(1, 1, 10))
        s.sync()
    db = raw_db(path)
    log = db.get_column_family("raft_log")
    log[index_key(3)] = log[index_key(4)]
    del log
    db.close()
    del db
    with RocksStorage(path) as s, pytest.raises(CorruptEntry) as exc:
        s.term(3)
    assert exc.value.context["index"] == 3


def test_damaged_last_entry_fails_at_open(path):
    with RocksStorage(path) as s:
        s.write(HardState(1), ents(1, 1, 4))
        s.sync()
    db = raw_db(path)
    log = db.get_column_family("raft_log")
    log[index_key(3)] = b"\x01\x00\x00"
    del log
    db.close()
    del db
    with pytest.raises(CorruptEntry):
        RocksStorage(path)


def test_unknown_storage_format_version_is_refused_at_open(path):
    RocksStorage(path).close()
    db = raw_db(path)
    meta = db.get_column_family("raft_meta")
    meta[b"format"] = struct.pack(">I", 2)
    del meta
    db.close()
    del db
    with pytest.raises(UnsupportedFormat) as exc:
        RocksStorage(path)
    assert "format 2" in exc.value.message


def test_unknown_record_version_is_refused_on_read(path):
    with RocksStorage(path) as s:
        s.write(None, ents(1, 1, 4))
        s.sync()
    db = raw_db(path)
    log = db.get_column_family("raft_log")
    log[index_key(2)] = b"\x07" + log[index_key(2)][1:]
    del log
    db.close()
    del db
    with RocksStorage(path) as s, pytest.raises(UnsupportedFormat):
        s.entries(1, 4)


def test_database_is_released_on_close(path):
    s = RocksStorage(path)
    s.write(None, ents(1, 1, 2))
    s.sync()
    s.close()
    with RocksStorage(path) as again:
        assert again.last_index() == 1
