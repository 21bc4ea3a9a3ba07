"""Raft log storage in RocksDB (rocksdict, raw mode).

Layout, one column family per concern:

    raft_log    8-byte big-endian index -> entry record   (byte order = index order)
    raft_meta   b"format"     -> 4-byte big-endian format version
                b"hard_state" -> HardState record
                b"log_base"   -> (index, term) record of the entry just before
                                 the first one held (the snapshot's or the
                                 compaction point's)
    raft_snap   b"meta"       -> SnapshotMeta record
                b"data"       -> snapshot data record

Every record is `version (1 byte) | crc32 (4 bytes, big-endian) | payload`,
the CRC covering the key, the version and the payload, so a record that was
damaged, or copied under the wrong key, fails on read with `CorruptEntry`
naming where it was.

Durability is split as the contract asks: `write()` applies one WriteBatch
with the WAL on and sync off (atomic, visible at once, not durable); `sync()`
is `flush_wal(True)`, the expensive part, which the trio driver runs in a
worker thread once per group of writes. RocksDB replays its WAL as a prefix
of whole batches, so after a crash the log is the state after some write
no earlier than the last completed `sync()`.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from typing import TypeVar

import msgspec
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from cloudless.raft.messages import EMPTY_SNAPSHOT, ConfState, Entry, HardState, Snapshot, SnapshotMeta, entry_size
from cloudless.raft.storage import Compacted, CorruptEntry, EntryUnavailable, StorageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORD_VERSION = 1

_CF_LOG = "raft_log"
_CF_META = "raft_meta"
_CF_SNAP = "raft_snap"

_KEY_FORMAT = b"format"
_KEY_HARD_STATE = b"hard_state"
_KEY_LOG_BASE = b"log_base"
_KEY_SNAP_META = b"meta"
_KEY_SNAP_DATA = b"data"

_HEADER = struct.Struct(">BI")
_INDEX = struct.Struct(">Q")

# Recently written entries kept decoded: the leader reads what it just
# appended to send it, and term() of the tail is asked on every message.
_TAIL_CACHE = 4096

_T = TypeVar("_T")


class UnsupportedFormat(StorageError):
    """The database (or a record in it) was written in a format this build does not read."""


class _LogBase(msgspec.Struct, frozen=True, array_like=True):
    index: int
    term: int


def index_key(index: int) -> bytes:
    return _INDEX.pack(index)


def _seal(key: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes((RECORD_VERSION,)), zlib.crc32(key)))
    return _HEADER.pack(RECORD_VERSION, crc) + payload


def _open(key: bytes, record: bytes, where: str) -> bytes:
    if len(record) < _HEADER.size:
        raise CorruptEntry(f"{where}: record too short", length=len(record))
    version, crc = _HEADER.unpack_from(record)
    if version != RECORD_VERSION:
        raise UnsupportedFormat(f"{where}: record format {version}, this build reads {RECORD_VERSION}")
    payload = record[_HEADER.size :]
    if zlib.crc32(payload, zlib.crc32(bytes((version,)), zlib.crc32(key))) != crc:
        raise CorruptEntry(f"{where}: checksum mismatch")
    return payload


def _column_families() -> dict[str, Options]:
    return {name: Options(raw_mode=True) for name in (_CF_LOG, _CF_META, _CF_SNAP)}


class RocksStorage:
    """`WritableLogStorage` over RocksDB. One instance per directory; not thread-safe
    except that `sync()` may run in a worker thread while nothing else is called."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        self._db = Rdict(self.path, options=options, column_families=_column_families())
        self._closed = False
        self._log = self._db.get_column_family(_CF_LOG)
        self._meta = self._db.get_column_family(_CF_META)
        self._snap = self._db.get_column_family(_CF_SNAP)
        self._log_cf = self._db.get_column_family_handle(_CF_LOG)
        self._meta_cf = self._db.get_column_family_handle(_CF_META)
        self._snap_cf = self._db.get_column_family_handle(_CF_SNAP)
        self._write_options = WriteOptions()
        self._write_options.sync = False
        # rocksdict's stub declares disable_wal a method; at runtime it is a property.
        self._write_options.disable_wal = False  # type: ignore[method-assign,assignment]
        self._enc = msgspec.msgpack.Encoder()
        self._entry_dec = msgspec.msgpack.Decoder(Entry)
        self._tail: dict[int, Entry] = {}
        try:
            self._check_format()
            self._load()
        except BaseException:
            self.close()
            raise

    # -- open / close --------------------------------------------------------

    def _check_format(self) -> None:
        stored = self._meta.get(_KEY_FORMAT)
        if stored is None:
            if self._meta.get(_KEY_HARD_STATE) is not None or self._last_key() is not None:
                raise UnsupportedFormat("raft storage holds data but no format version", path=self.path)
            self._meta[_KEY_FORMAT] = struct.pack(">I", FORMAT_VERSION)
            self._db.flush_wal(True)
            return
        if len(stored) != 4 or struct.unpack(">I", stored)[0] != FORMAT_VERSION:
            found = struct.unpack(">I", stored)[0] if len(stored) == 4 else stored.hex()
            raise UnsupportedFormat(
                f"raft storage format {found} at {self.path}, this build reads {FORMAT_VERSION}",
                path=self.path,
                found=found,
            )

    def _load(self) -> None:
        raw = self._meta.get(_KEY_HARD_STATE)
        self._hard_state = HardState() if raw is None else self._decode(_KEY_HARD_STATE, raw, HardState, "hard state")
        raw = self._meta.get(_KEY_LOG_BASE)
        base = _LogBase(0, 0) if raw is None else self._decode(_KEY_LOG_BASE, raw, _LogBase, "log base")
        self._base_index, self._base_term = base.index, base.term
        raw = self._snap.get(_KEY_SNAP_META)
        self._snapshot_meta = (
            EMPTY_SNAPSHOT.meta if raw is None else self._decode(_KEY_SNAP_META, raw, SnapshotMeta, "snapshot meta")
        )
        first, last = self._first_key(), self._last_key()
        if first is None or last is None:
            self._last_index = self._base_index
        else:
            if first != self._base_index + 1:
                raise CorruptEntry("log does not start right after its base", first=first, base_index=self._base_index)
            self._last_index = last
            self._read_entry(last)  # a damaged tail should fail at open, not mid-election
        log.info(
            "raft.rocks.opened",
            extra={
                "path": self.path,
                "first_index": self.first_index(),
                "last_index": self._last_index,
                "term": self._hard_state.term,
                "commit": self._hard_state.commit,
            },
        )

    def close(self) -> None:
        """Release the database (and its lock); the instance is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        # Column-family objects keep the database (and its file lock) alive.
        del self._log, self._meta, self._snap, self._log_cf, self._meta_cf, self._snap_cf
        self._db.close()

    def __enter__(self) -> RocksStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- records -------------------------------------------------------------

    def _decode(self, key: bytes, record: bytes, type_: type[_T], where: str) -> _T:
        payload = _open(key, record, where)
        try:
            return msgspec.msgpack.decode(payload, type=type_)
        except msgspec.DecodeError as exc:
            raise CorruptEntry(f"{where}: undecodable ({exc})") from exc

    def _first_key(self) -> int | None:
        it = self._log.iter()
        it.seek_to_first()
        return _INDEX.unpack(it.key())[0] if it.valid() else None

    def _last_key(self) -> int | None:
        it = self._log.iter()
        it.seek_to_last()
        return _INDEX.unpack(it.key())[0] if it.valid() else None

    def _decode_entry(self, index: int, key: bytes, record: bytes) -> Entry:
        where = f"raft log entry {index}"
        try:
            payload = _open(key, record, where)
            entry = self._entry_dec.decode(payload)
        except msgspec.DecodeError as exc:
            raise CorruptEntry(f"{where}: undecodable ({exc})", index=index) from exc
        except CorruptEntry as exc:
            raise CorruptEntry(exc.message, index=index) from None
        if entry.index != index:
            raise CorruptEntry(f"{where}: holds index {entry.index}", index=index)
        return entry

    def _read_entry(self, index: int) -> Entry:
        cached = self._tail.get(index)
        if cached is not None:
            return cached
        key = index_key(index)
        record = self._log.get(key)
        if record is None:
            raise CorruptEntry(f"raft log entry {index} is missing inside the log", index=index)
        return self._decode_entry(index, key, record)

    # -- read side (LogStorage) -------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot_meta.conf_state

    def first_index(self) -> int:
        return self._base_index + 1

    def last_index(self) -> int:
        return self._last_index

    def term(self, index: int) -> int:
        if index < self._base_index:
            raise Compacted("entry compacted", index=index, first_index=self._base_index + 1)
        if index == self._base_index:
            return self._base_term
        if index > self._last_index:
            raise EntryUnavailable("entry not yet in log", index=index, last_index=self._last_index)
        return self._read_entry(index).term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        if lo <= self._base_index:
            raise Compacted("entries compacted", lo=lo, first_index=self._base_index + 1)
        if hi > self._last_index + 1:
            raise EntryUnavailable("entries not yet in log", hi=hi, last_index=self._last_index)
        out: list[Entry] = []
        total = 0
        index = lo
        it = None
        while index < hi:
            entry = self._tail.get(index)
            if entry is None:
                if it is None:
                    it = self._log.iter()
                    it.seek(index_key(index))
                if not it.valid() or it.key() != index_key(index):
                    raise CorruptEntry(f"raft log entry {index} is missing inside the log", index=index)
                entry = self._decode_entry(index, it.key(), it.value())
                it.next()
            elif it is not None:
                it.next()
            total += entry_size(entry)
            if max_bytes is not None and total > max_bytes and out:
                break
            out.append(entry)
            index += 1
        return out

    def snapshot(self) -> Snapshot:
        raw = self._snap.get(_KEY_SNAP_DATA)
        if raw is None:
            if self._snapshot_meta.index == 0:
                return Snapshot(self._snapshot_meta, b"")
            raise CorruptEntry("snapshot data missing", index=self._snapshot_meta.index)
        data = _open(_KEY_SNAP_DATA, raw, f"snapshot data at {self._snapshot_meta.index}")
        return Snapshot(self._snapshot_meta, data)

    # -- write side --------------------------------------------------------------

    def write(self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None = None) -> None:
        batch = WriteBatch(raw_mode=True)
        # New in-memory view, committed only once the batch is in RocksDB.
        base_index, base_term, last_index = self._base_index, self._base_term, self._last_index
        snapshot_meta = self._snapshot_meta
        tail_drop_from: int | None = None
        if snapshot is not None and snapshot.meta.index >= snapshot_meta.index:
            meta = snapshot.meta
            self._put_snapshot(batch, snapshot)
            snapshot_meta = meta
            if meta.index >= base_index:
                keeps_log = meta.index <= last_index and self.term(meta.index) == meta.term
                drop_to = meta.index if keeps_log else last_index
                if drop_to > base_index:
                    batch.delete_range(index_key(base_index + 1), index_key(drop_to + 1), self._log_cf)
                if not keeps_log:
                    last_index = meta.index
                    tail_drop_from = 0
                base_index, base_term = meta.index, meta.term
                batch.put(
                    _KEY_LOG_BASE,
                    _seal(_KEY_LOG_BASE, self._enc.encode(_LogBase(base_index, base_term))),
                    self._meta_cf,
                )
        if entries:
            first = entries[0].index
            if first > last_index + 1:
                raise StorageError("append leaves a gap in the log", first=first, last_index=last_index)
            entries = [e for e in entries if e.index > base_index]
            if entries:
                first = entries[0].index
                for expected, entry in enumerate(entries, start=first):
                    if entry.index != expected:
                        raise StorageError("entries to append are not contiguous", index=entry.index, expected=expected)
                if first <= last_index:
                    batch.delete_range(index_key(first), index_key(last_index + 1), self._log_cf)
                    tail_drop_from = first if tail_drop_from is None else min(tail_drop_from, first)
                for entry in entries:
                    key = index_key(entry.index)
                    batch.put(key, _seal(key, self._enc.encode(entry)), self._log_cf)
                last_index = entries[-1].index
        if hard_state is not None:
            batch.put(_KEY_HARD_STATE, _seal(_KEY_HARD_STATE, self._enc.encode(hard_state)), self._meta_cf)
        if batch.len() == 0:
            return
        self._db.write(batch, self._write_options)
        if tail_drop_from is not None:
            self._tail = {i: e for i, e in self._tail.items() if i < tail_drop_from and i > base_index}
        if base_index != self._base_index:
            self._tail = {i: e for i, e in self._tail.items() if i > base_index}
        self._base_index, self._base_term, self._last_index = base_index, base_term, last_index
        self._snapshot_meta = snapshot_meta
        if hard_state is not None:
            self._hard_state = hard_state
        # Keys are inserted in ascending order (an overwritten suffix was dropped above), so the
        # dict's insertion order is index order and the first key is the oldest.
        for entry in entries:
            self._tail[entry.index] = entry
        excess = len(self._tail) - _TAIL_CACHE
        if excess > 0:
            for index in list(itertools.islice(self._tail, excess)):
                del self._tail[index]

    def _put_snapshot(self, batch: WriteBatch, snapshot: Snapshot) -> None:
        batch.put(_KEY_SNAP_META, _seal(_KEY_SNAP_META, self._enc.encode(snapshot.meta)), self._snap_cf)
        batch.put(_KEY_SNAP_DATA, _seal(_KEY_SNAP_DATA, snapshot.data), self._snap_cf)

    def sync(self) -> None:
        """Make every write so far durable (fsync of the WAL); run it off the event loop."""
        self._db.flush_wal(True)

    def compact(self, index: int) -> None:
        if index <= self._base_index:
            return
        if index > self._last_index:
            raise EntryUnavailable("cannot compact past the last entry", index=index, last_index=self._last_index)
        term = self.term(index)
        batch = WriteBatch(raw_mode=True)
        batch.delete_range(index_key(self._base_index + 1), index_key(index + 1), self._log_cf)
        batch.put(_KEY_LOG_BASE, _seal(_KEY_LOG_BASE, self._enc.encode(_LogBase(index, term))), self._meta_cf)
        self._db.write(batch, self._write_options)
        self._base_index, self._base_term = index, term
        self._tail = {i: e for i, e in self._tail.items() if i > index}

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record the application's snapshot; durable with the next sync()."""
        if index < self._snapshot_meta.index:
            raise StorageError("snapshot older than the current one", index=index, current=self._snapshot_meta.index)
        snapshot = Snapshot(SnapshotMeta(index, self.term(index), conf_state), data)
        batch = WriteBatch(raw_mode=True)
        self._put_snapshot(batch, snapshot)
        self._db.write(batch, self._write_options)
        self._snapshot_meta = snapshot.meta
        return snapshot
