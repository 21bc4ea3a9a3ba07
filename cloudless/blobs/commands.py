"""The blob catalog's commands: every change to buckets, manifests, uploads and
access keys as a tagged msgspec message, validated on decode.

`cloudless.blobs.catalog.Catalog` applies them (locally in `LocalMetadataStore`,
or in the cluster's Raft state machine after they commit).
"""

from __future__ import annotations

import msgspec

from cloudless.blobs.manifest import AccessKey, Bucket, MultipartUpload, ObjectManifest, UploadPart
from cloudless.errors import InvalidInput


class BlobCommand(msgspec.Struct, frozen=True, tag_field="c", forbid_unknown_fields=True):
    pass


class CreateBucket(BlobCommand, tag="blob.bucket.create", frozen=True):
    bucket: Bucket


class DeleteBucket(BlobCommand, tag="blob.bucket.rm", frozen=True):
    """Refused while the bucket holds objects; open uploads go with it."""

    name: str


class PutManifest(BlobCommand, tag="blob.put", frozen=True):
    """`expected_version` None: unconditional; 0: the key must not exist; n: it must be at version n."""

    manifest: ObjectManifest
    expected_version: int | None = None


class DeleteManifest(BlobCommand, tag="blob.rm", frozen=True):
    bucket: str
    key: str
    expected_version: int | None = None


class CreateUpload(BlobCommand, tag="blob.upload.create", frozen=True):
    upload: MultipartUpload


class PutPart(BlobCommand, tag="blob.upload.part", frozen=True):
    part: UploadPart


class CompleteUpload(BlobCommand, tag="blob.upload.complete", frozen=True):
    upload_id: str
    manifest: ObjectManifest


class AbortUpload(BlobCommand, tag="blob.upload.abort", frozen=True):
    upload_id: str


class PutAccessKey(BlobCommand, tag="blob.key.put", frozen=True):
    key: AccessKey


class DeleteAccessKey(BlobCommand, tag="blob.key.rm", frozen=True):
    access_key: str


BlobCommandUnion = (
    CreateBucket
    | DeleteBucket
    | PutManifest
    | DeleteManifest
    | CreateUpload
    | PutPart
    | CompleteUpload
    | AbortUpload
    | PutAccessKey
    | DeleteAccessKey
)

_command_decoder = msgspec.msgpack.Decoder(BlobCommandUnion)
_enc = msgspec.msgpack.Encoder()


class InvalidBlobCommand(InvalidInput):
    code = "invalid_blob_command"


def encode_command(command: BlobCommand) -> bytes:
    return _enc.encode(command)


def decode_command(data: bytes) -> BlobCommand:
    try:
        return _command_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidBlobCommand(f"invalid blob command: {exc}") from None
