"""Blob storage errors, each mapped to a CLI exit code through its base."""

from __future__ import annotations

import trio

from cloudless.errors import CloudlessError, Conflict, InvalidInput, NotFound, Unavailable


class CorruptChunk(CloudlessError):
    """A stored chunk's content no longer hashes to its digest (bit rot, torn write)."""

    code = "corrupt_chunk"


class ChunkMissing(NotFound):
    code = "chunk_missing"


class InvalidDigest(InvalidInput):
    code = "invalid_digest"


class InvalidBucketName(InvalidInput):
    code = "invalid_bucket_name"


class InvalidObjectKey(InvalidInput):
    code = "invalid_key"


class NoSuchBucket(NotFound):
    code = "no_such_bucket"


class NoSuchKey(NotFound):
    code = "no_such_key"


class NoSuchUpload(NotFound):
    code = "no_such_upload"


class BucketAlreadyExists(Conflict):
    code = "bucket_exists"


class BucketNotEmpty(Conflict):
    code = "bucket_not_empty"


class PreconditionFailed(Conflict):
    """A compare-and-set on a manifest version did not hold."""

    code = "precondition_failed"


class InvalidPart(InvalidInput):
    code = "invalid_part"


class InvalidPartOrder(InvalidInput):
    code = "invalid_part_order"


class EntityTooSmall(InvalidInput):
    code = "entity_too_small"


class BadDigest(InvalidInput):
    """The content did not match the checksum the client sent."""

    code = "bad_digest"


class IncompleteBody(InvalidInput):
    code = "incomplete_body"


class InsufficientReplicas(Unavailable):
    """Fewer than the required replicas could be made durable."""

    code = "insufficient_replicas"


class NoSuchAccessKey(NotFound):
    code = "no_such_access_key"


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The one real error inside a nursery's exception group (others being cancellations), or the group.

    trio wraps whatever a nursery's tasks raise; callers of the blob API want
    the `NoSuchKey` or `BadDigest` itself."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group
