"""Chunk store: durability layout, compression choice, verification on read, index."""

from __future__ import annotations

import os

import pytest

from cloudless.blobs.chunking import ChunkDigest
from cloudless.blobs.chunkstore import (
    CODEC_RAW,
    CODEC_ZSTD,
    LocalChunkStore,
    MemoryChunkStore,
    encode_chunk,
    summarize,
)
from cloudless.blobs.errors import ChunkMissing, CorruptChunk


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        s = LocalChunkStore(tmp_path / "store")
        yield s
        s.close()
    else:
        yield MemoryChunkStore()


def test_put_get_has_delete(store):
    data = os.urandom(100_000)
    d = ChunkDigest.of(data)
    assert store.put(d, data) is True
    assert store.put(d, data) is False  # already held
    assert store.has([d, "0" * 64]) == {d}
    assert store.get(d) == data
    assert list(store.digests()) == [d]
    assert store.info(d).size == len(data)
    assert store.delete(d) is True
    assert store.has([d]) == set()
    with pytest.raises(ChunkMissing):
        store.get(d)


def test_put_refuses_content_that_does_not_match_its_digest(store):
    with pytest.raises(CorruptChunk):
        store.put(ChunkDigest.of(b"one"), b"two")
    assert list(store.digests()) == []


def test_summary_tracks_puts_and_deletes(store):
    chunks = [os.urandom(1000) for _ in range(50)]
    for c in chunks:
        store.put(ChunkDigest.of(c), c)
    store.delete(ChunkDigest.of(chunks[0]))
    assert store.summary() == summarize(ChunkDigest.of(c) for c in chunks[1:])


def test_compression_only_when_it_clearly_helps():
    assert encode_chunk(b"a" * 100_000)[0] == CODEC_ZSTD
    assert encode_chunk(os.urandom(100_000))[0] == CODEC_RAW
    assert encode_chunk(os.urandom(200))[0] == CODEC_RAW


def test_on_disk_layout_is_fanned_out_with_codec_header(tmp_path):
    store = LocalChunkStore(tmp_path)
    text = b"compressible " * 10_000
    d = ChunkDigest.of(text)
    store.put(d, text)
    path = tmp_path / "chunks" / d[:2] / d[2:4] / d
    raw = path.read_bytes()
    assert raw[0] == CODEC_ZSTD and len(raw) < len(text) // 10
    assert store.info(d).stored_size == len(raw)
    assert list((tmp_path / "tmp").iterdir()) == []  # temp file renamed away
    store.close()


def test_a_flipped_byte_on_disk_is_detected_on_read(tmp_path):
    store = LocalChunkStore(tmp_path)
    data = os.urandom(50_000)
    d = ChunkDigest.of(data)
    store.put(d, data)
    path = store.path_of(d)
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunk):
        store.get(d)
    store.close()


def test_index_survives_reopen_and_leftover_temp_files_are_removed(tmp_path):
    store = LocalChunkStore(tmp_path)
    data = os.urandom(10_000)
    d = ChunkDigest.of(data)
    store.put(d, data)
    store.close()
    (tmp_path / "tmp" / "partial.write").write_bytes(b"half a chunk")
    again = LocalChunkStore(tmp_path)
    assert again.has([d]) == {d} and again.get(d) == data
    assert again.summary() == summarize([d])
    assert list((tmp_path / "tmp").iterdir()) == []
    again.close()


def test_rebuild_index_adopts_files_the_index_lost(tmp_path):
    store = LocalChunkStore(tmp_path)
    data = os.urandom(10_000)
    d = ChunkDigest.of(data)
    store.put(d, data)
    store._db.delete(d.encode())  # as if the index write was lost in a crash
    assert store.has([d]) == set()
    assert store.rebuild_index() == 1
    assert store.has([d]) == {d}
    store.close()


def test_touch_restarts_the_gc_clock():
    now = [100.0]
    store = MemoryChunkStore(clock=lambda: now[0])
    d = ChunkDigest.of(b"x")
    store.put(d, b"x")
    now[0] = 500.0
    assert store.touch([d, "0" * 64]) == {d}
    assert store.info(d).created == 500.0


def test_reopening_after_an_unclean_stop_adopts_unindexed_files(tmp_path):
    store = LocalChunkStore(tmp_path)
    data = os.urandom(10_000)
    d = ChunkDigest.of(data)
    store.put(d, data)
    store._db.delete(d.encode())  # crash between the file's rename and its index write...
    store._db.close()  # ...and no clean close
    again = LocalChunkStore(tmp_path)
    assert again.has([d]) == {d}
    again.close()
    third = LocalChunkStore(tmp_path)  # clean stop: no walk needed, still indexed
    assert third.has([d]) == {d}
    third.close()


def test_capacity_override_counts_stored_bytes_across_reopen(tmp_path):
    store = LocalChunkStore(tmp_path, capacity_bytes=10_000_000)
    data = os.urandom(100_000)
    store.put(ChunkDigest.of(data), data)
    assert store.capacity() == (10_000_000, 10_000_000 - 100_001)
    store.close()
    again = LocalChunkStore(tmp_path, capacity_bytes=10_000_000)
    assert again.used_bytes == 100_001
    again.delete(ChunkDigest.of(data))
    assert again.capacity()[1] == 10_000_000
    again.close()


def test_concurrent_puts_of_one_chunk_keep_the_summary_and_usage_right(tmp_path):
    import threading

    store = LocalChunkStore(tmp_path, capacity_bytes=1 << 30)
    data = os.urandom(200_000)
    d = ChunkDigest.of(data)
    threads = [threading.Thread(target=store.put, args=(d, data)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.summary() == summarize([d])
    assert store.used_bytes == store.info(d).stored_size
    store.close()


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_delete_older_than_spares_a_chunk_touched_meanwhile(kind, tmp_path):
    """GC decides on age, then deletes only if the chunk is still that old: a write that
    dedups against it in between (touch) wins."""
    now = [100.0]
    store = (
        LocalChunkStore(tmp_path, clock=lambda: now[0]) if kind == "local" else MemoryChunkStore(clock=lambda: now[0])
    )
    data = os.urandom(1000)
    d = ChunkDigest.of(data)
    store.put(d, data)
    now[0] = 5000.0
    store.touch([d])  # the racing write
    assert store.delete(d, older_than=5000.0 - 60) is False
    assert store.has([d]) == {d}
    assert store.delete(d, older_than=5001.0) is True
    assert store.has([d]) == set()
