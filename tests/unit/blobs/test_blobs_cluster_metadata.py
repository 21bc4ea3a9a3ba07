"""The Raft-backed blob MetadataStore: catalog commands through the replicated
state machine (deterministic apply, refusals as Rejected mapped back to the blob
error types, the catalog inside snapshots) — with the node's Raft replaced by a
twin that applies each proposal to a real StateMachine at once."""

from __future__ import annotations

import msgspec
import pytest
import zstandard

from cloudless.blobs.chunkstore import MemoryChunkStore
from cloudless.blobs.commands import CreateBucket, PutManifest, encode_command
from cloudless.blobs.errors import BucketAlreadyExists, BucketNotEmpty, NoSuchBucket, NoSuchKey, PreconditionFailed
from cloudless.blobs.manifest import Bucket, ObjectManifest
from cloudless.blobs.objects import ObjectService
from cloudless.node.blobs import RaftMetadataStore, blob_error
from cloudless.state import fsm as fsm_module
from cloudless.state.commands import BlobCatalogCommand, BlobResult, Proposal, Rejected, encode_proposal
from cloudless.state.fsm import StateMachine


class TwinReplicated:
    """`ReplicatedState` as RaftMetadataStore uses it: propose applies at once on one FSM."""

    def __init__(self) -> None:
        self.fsm = StateMachine()
        self.is_member = True
        self.reads = 0

    async def propose(self, command, *, timeout: float = 5.0):
        index = self.fsm.applied_index + 1
        return self.fsm.apply(index, encode_proposal(Proposal(command=command, now=1000.0))), index

    async def linearizable(self, timeout: float = 5.0) -> None:
        self.reads += 1


def _no_address(node_id: str) -> None:
    return None


def _apply(fsm: StateMachine, command) -> object:
    data = encode_proposal(Proposal(command=BlobCatalogCommand(encode_command(command)), now=1.0))
    return fsm.apply(fsm.applied_index + 1, data)


def test_fsm_applies_blob_commands_and_rejects_with_the_blob_error_code():
    fsm = StateMachine()
    created = _apply(fsm, CreateBucket(Bucket("photos", 1.0)))
    assert isinstance(created, BlobResult)
    again = _apply(fsm, CreateBucket(Bucket("photos", 2.0)))
    assert again == Rejected(kind="bucket_exists", message="bucket 'photos' already exists")
    assert fsm.catalog.get_bucket("photos").created == 1.0  # the refused command changed nothing
    stored = _apply(fsm, PutManifest(ObjectManifest("photos", "k", 1, "e", "t", {}, [], 0, 1.0)))
    assert msgspec.convert(msgspec.msgpack.decode(stored.value), ObjectManifest).version == 1


def test_snapshot_carries_the_catalog_and_images_without_it_still_load():
    fsm = StateMachine()
    _apply(fsm, CreateBucket(Bucket("photos", 1.0)))
    restored = StateMachine()
    restored.restore(fsm.snapshot())
    assert [b.name for b in restored.catalog.list_buckets()] == ["photos"]

    # An image written before blob storage existed has no `blobs` field.
    old = msgspec.msgpack.encode(
        {"applied_index": 3, "vars": {}, "tokens": {}, "nodes": {}, "revoked": {}, "ca": None, "sessions": []}
    )
    body = zstandard.ZstdCompressor().compress(old)
    import zlib

    header = (
        fsm_module.SNAPSHOT_MAGIC + fsm_module.SNAPSHOT_VERSION.to_bytes(2, "big") + zlib.crc32(body).to_bytes(4, "big")
    )
    legacy = StateMachine()
    legacy.restore(header + body)
    assert legacy.applied_index == 3 and legacy.catalog.list_buckets() == []


@pytest.mark.parametrize(
    "code, kind",
    [
        ("no_such_bucket", NoSuchBucket),
        ("no_such_key", NoSuchKey),
        ("bucket_not_empty", BucketNotEmpty),
        ("precondition_failed", PreconditionFailed),
        ("bucket_exists", BucketAlreadyExists),
    ],
)
def test_rejections_map_back_to_blob_error_types(code, kind):
    error = blob_error(code, "msg")
    assert type(error) is kind and error.code == code


async def test_object_service_over_the_raft_store_round_trips_and_raises_blob_errors():
    replicated = TwinReplicated()
    meta = RaftMetadataStore(replicated, _no_address, rpc=None)  # type: ignore[arg-type]
    service = ObjectService(meta, MemoryChunkStore(), node_id="n1", replication=1)
    await service.create_bucket("photos")
    with pytest.raises(BucketAlreadyExists):
        await service.create_bucket("photos")
    body = bytes(range(256)) * 4000
    first = await service.put_object("photos", "a/b.bin", body, metadata={"k": "v"})
    second = await service.put_object("photos", "a/b.bin", body)
    assert (first.version, second.version) == (1, 2)
    assert await service.get_bytes("photos", "a/b.bin") == body
    page = await service.list_objects("photos", prefix="a/")
    assert [m.key for m in page.objects] == ["a/b.bin"]
    with pytest.raises(PreconditionFailed):
        await meta.put_manifest(first, expected_version=1)
    assert await meta.referenced_digests() == {c.digest for c in second.chunks}
    assert await service.delete_object("photos", "a/b.bin") is True
    with pytest.raises(NoSuchKey):
        await service.get_bytes("photos", "a/b.bin")
    with pytest.raises(NoSuchBucket):
        await meta.list_manifests("nope")
    key = await service.create_access_key(description="d")
    assert (await meta.get_access_key(key.access_key)).secret_key == key.secret_key
    assert replicated.reads > 0  # reads went through ReadIndex


class _Peer:
    kind = "node"
    name = "n2"


class _Ctx:
    peer = _Peer()


class LeaderRpc:
    """Delivers `blobs.catalog.read` to the leader's store in-process (the RPC client twin)."""

    def __init__(self, leader_store: RaftMetadataStore) -> None:
        self.leader_store = leader_store
        self.calls: list[str] = []

    async def call(self, address, method, request, timeout=None):  # type: ignore[no-untyped-def]
        from cloudless.node.blobs import CatalogRead

        self.calls.append(method)
        decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=CatalogRead)
        try:
            return await self.leader_store.serve_read(_Ctx(), decoded)
        except Exception as exc:  # the wire keeps only the code and message
            from cloudless.errors import CloudlessError

            assert isinstance(exc, CloudlessError)
            remote = CloudlessError(exc.message)
            remote.code = exc.code
            raise remote from None


async def test_a_node_outside_raft_reads_the_catalog_from_the_leader():
    leader_store = RaftMetadataStore(TwinReplicated(), _no_address, rpc=None)  # type: ignore[arg-type]
    await leader_store.create_bucket(Bucket("photos", 1.0))

    outside = TwinReplicated()  # an empty copy it must not read from
    outside.is_member = False

    async def wait_leader() -> str:
        return "n1"

    outside.wait_leader = wait_leader  # type: ignore[attr-defined]
    rpc = LeaderRpc(leader_store)
    store = RaftMetadataStore(outside, lambda node_id: ("127.0.0.1", 1), rpc)  # type: ignore[arg-type]
    assert [b.name for b in await store.list_buckets()] == ["photos"]
    with pytest.raises(NoSuchBucket):
        await store.get_bucket("nope")
    assert await store.referenced_digests() == set()
    assert rpc.calls == ["blobs.catalog.read"] * 3
