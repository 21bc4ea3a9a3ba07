"""kill -9 of a writer mid-upload: no visible object, and GC reclaims every chunk it wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import trio

from cloudless.blobs.local import blobs_dir, open_local_blobs


def test_kill_9_mid_upload_leaves_no_object_and_no_chunks_after_gc(cloudless_bin, tmp_path):
    data_dir = tmp_path / "node"
    keep = tmp_path / "keep.bin"
    keep.write_bytes(os.urandom(2_000_000))
    subprocess.run(
        [cloudless_bin, "blob", "put", str(keep), "bkt/kept", "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    chunk_dir = blobs_dir(data_dir) / "store" / "chunks"
    before = {p.name for p in chunk_dir.glob("*/*/*")}

    writer = subprocess.Popen(
        [cloudless_bin, "blob", "put", "-", "bkt/partial", "--data-dir", str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while {p.name for p in chunk_dir.glob("*/*/*")} == before:
            assert time.monotonic() < deadline, "the writer never stored a chunk"
            assert writer.poll() is None
            writer.stdin.write(os.urandom(1 << 20))
            writer.stdin.flush()
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(10)
    leaked = {p.name for p in chunk_dir.glob("*/*/*")} - before
    assert leaked

    async def check() -> None:
        with open_local_blobs(data_dir) as service:
            page = await service.list_objects("bkt")
            assert [m.key for m in page.objects] == ["kept"]
            assert await service.collect_garbage(grace=3600) == []  # still inside the grace period
            deleted = await service.collect_garbage(grace=0)
            assert set(deleted) == leaked
            assert await service.get_bytes("bkt", "kept") == keep.read_bytes()

    trio.run(check)
    assert {p.name for p in chunk_dir.glob("*/*/*")} == before
