"""The catalog as a replicated state machine: commands encode/decode with
validation, apply is deterministic, a refused command changes nothing, and
snapshots round-trip."""

from __future__ import annotations

import random

import msgspec
import pytest

from cloudless.blobs.catalog import Catalog, MemoryKV
from cloudless.blobs.chunking import ChunkRef
from cloudless.blobs.commands import (
    AbortUpload,
    CompleteUpload,
    CreateBucket,
    CreateUpload,
    DeleteManifest,
    InvalidBlobCommand,
    PutManifest,
    PutPart,
    decode_command,
    encode_command,
)
from cloudless.blobs.errors import PreconditionFailed
from cloudless.blobs.manifest import Bucket, MultipartUpload, ObjectManifest, UploadPart
from cloudless.errors import CloudlessError


def manifest(key: str, n: int = 0) -> ObjectManifest:
    return ObjectManifest("bkt", key, 1, "e", "t", {}, [ChunkRef(f"{n:064x}", 1, 0)], 0, float(n))


def random_commands(seed: int, n: int = 200) -> list:
    rng = random.Random(seed)
    cmds: list = [CreateBucket(Bucket("bkt", 0.0))]
    uploads: list[str] = []
    for i in range(n):
        kind = rng.choice(["put", "cas", "rm", "upload", "part", "complete", "abort"])
        key = rng.choice("abcde")
        if kind == "put":
            cmds.append(PutManifest(manifest(key, i)))
        elif kind == "cas":
            cmds.append(PutManifest(manifest(key, i), expected_version=rng.randrange(0, 4)))
        elif kind == "rm":
            cmds.append(DeleteManifest("bkt", key, rng.choice([None, 1, 2])))
        elif kind == "upload":
            uploads.append(f"u{i}")
            cmds.append(CreateUpload(MultipartUpload(f"u{i}", "bkt", key, float(i))))
        elif uploads and kind == "part":
            cmds.append(
                PutPart(
                    UploadPart(
                        rng.choice(uploads), rng.randrange(1, 4), 1, "e", [ChunkRef(f"{i:064x}", 1, 0)], float(i)
                    )
                )
            )
        elif uploads and kind == "complete":
            cmds.append(CompleteUpload(rng.choice(uploads), manifest(key, i)))
        elif uploads:
            cmds.append(AbortUpload(rng.choice(uploads)))
    return cmds


def apply_all(catalog: Catalog, commands: list) -> list[str]:
    outcomes = []
    for c in commands:
        try:
            catalog.apply(decode_command(encode_command(c)))
            outcomes.append("ok")
        except CloudlessError as exc:
            outcomes.append(exc.code)
    return outcomes


@pytest.mark.parametrize("seed", range(5))
def test_replicas_applying_the_same_commands_hold_the_same_state(seed):
    """Determinism (Raft §5: the state machine is a function of the committed log)."""
    commands = random_commands(seed)
    a, b = Catalog(MemoryKV()), Catalog(MemoryKV())
    outcomes = apply_all(a, commands)
    assert outcomes == apply_all(b, commands)
    assert "ok" in outcomes and {"precondition_failed", "no_such_upload"} & set(outcomes)  # both paths exercised
    assert a.export() == b.export()
    restored = Catalog.restore(a.export())
    assert restored.export() == a.export()
    assert restored.referenced_digests() == a.referenced_digests()


def test_a_refused_command_changes_nothing():
    catalog = Catalog(MemoryKV())
    catalog.apply(CreateBucket(Bucket("bkt", 0.0)))
    catalog.apply(PutManifest(manifest("k", 1)))
    before = catalog.export()
    with pytest.raises(PreconditionFailed):
        catalog.apply(PutManifest(manifest("k", 2), expected_version=0))
    assert catalog.export() == before


def test_decoding_validates_commands():
    with pytest.raises(InvalidBlobCommand):
        decode_command(msgspec.msgpack.encode({"c": "blob.nope"}))
    with pytest.raises(InvalidBlobCommand):
        decode_command(msgspec.msgpack.encode({"c": "blob.upload.abort", "upload_id": "u", "extra": 1}))
    bad_chunk = msgspec.msgpack.encode(
        {"c": "blob.put", "manifest": {**msgspec.to_builtins(manifest("k")), "chunks": [["zz", 1, 0]]}}
    )
    with pytest.raises(InvalidBlobCommand):
        decode_command(bad_chunk)
