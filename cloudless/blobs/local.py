"""This node's blob storage opened from its data directory (no cluster):

    <data-dir>/blobs/store/   LocalChunkStore (chunk files + RocksDB index)
    <data-dir>/blobs/meta/    LocalMetadataStore (RocksDB)
    <data-dir>/blobs/gateway/ the local S3 gateway's CA and certificate

What `cloudless blob` and `cloudless s3` use until the node serves them
through the cluster; the node itself builds an `ObjectService` from the same
chunk store with its Raft-backed metadata store and RPC peers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunkstore import LocalChunkStore
from cloudless.blobs.objects import ObjectService
from cloudless.errors import Unavailable


def blobs_dir(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / "blobs"


@contextmanager
def open_local_blobs(data_dir: Path, replication: int = 1) -> Iterator[ObjectService]:
    root = blobs_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        metadata = LocalMetadataStore(root / "meta")
    except Exception as exc:  # rocksdict raises a bare Exception for a held lock
        if "lock" in str(exc).lower():
            raise Unavailable(f"{root} is in use by another process (a running node?)", path=str(root)) from None
        raise
    try:
        store = LocalChunkStore(root / "store")
    except BaseException:
        metadata.close()
        raise
    try:
        yield ObjectService(metadata, store, replication=replication)
    finally:
        store.close()
        metadata.close()
