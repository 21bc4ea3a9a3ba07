"""S3 error codes with their HTTP status, and the mapping from blob errors."""

from __future__ import annotations

from cloudless.blobs import errors as blob
from cloudless.blobs.objects import InvalidContentMD5
from cloudless.errors import CloudlessError, InvalidInput, Unavailable

# code -> (status, default message), as S3 documents them.
CODES: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "Access Denied"),
    "AuthorizationHeaderMalformed": (400, "The authorization header is malformed."),
    "AuthorizationQueryParametersError": (400, "Error parsing the X-Amz-Credential parameter."),
    "BadDigest": (400, "The Content-MD5 you specified did not match what we received."),
    "BucketAlreadyExists": (409, "The requested bucket name is not available."),
    "BucketAlreadyOwnedByYou": (
        409,
        "Your previous request to create the named bucket succeeded and you already own it.",
    ),
    "BucketNotEmpty": (409, "The bucket you tried to delete is not empty"),
    "EntityTooLarge": (400, "Your proposed upload exceeds the maximum allowed size"),
    "EntityTooSmall": (400, "Your proposed upload is smaller than the minimum allowed object size."),
    "IncompleteBody": (400, "You did not provide the number of bytes specified by the Content-Length HTTP header."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "InvalidAccessKeyId": (403, "The AWS Access Key Id you provided does not exist in our records."),
    "InvalidArgument": (400, "Invalid Argument"),
    "InvalidBucketName": (400, "The specified bucket is not valid."),
    "InvalidDigest": (400, "The Content-MD5 you specified is not valid."),
    "InvalidPart": (
        400,
        (
            "One or more of the specified parts could not be found. The part may not have been uploaded, "
            "or the specified entity tag may not match the part's entity tag."
        ),
    ),
    "InvalidPartOrder": (400, "The list of parts was not in ascending order. Parts must be ordered by part number."),
    "InvalidRange": (416, "The requested range is not satisfiable"),
    "InvalidRequest": (400, "Invalid Request"),
    "KeyTooLongError": (400, "Your key is too long"),
    "MalformedXML": (400, "The XML you provided was not well-formed or did not validate against our published schema."),
    "MetadataTooLarge": (400, "Your metadata headers exceed the maximum allowed metadata size."),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "MissingContentLength": (411, "You must provide the Content-Length HTTP header."),
    "NoSuchBucket": (404, "The specified bucket does not exist"),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (
        404,
        (
            "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted "
            "or completed."
        ),
    ),
    "NotImplemented": (501, "A header you provided implies functionality that is not implemented."),
    "NotModified": (304, "Not Modified"),
    "PreconditionFailed": (412, "At least one of the pre-conditions you specified did not hold"),
    "RequestTimeout": (
        400,
        "Your socket connection to the server was not read from or written to within the timeout period.",
    ),
    "RequestTimeTooSkewed": (403, "The difference between the request time and the current time is too large."),
    "ServiceUnavailable": (503, "Please reduce your request rate."),
    "SignatureDoesNotMatch": (
        403,
        (
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method."
        ),
    ),
    "XAmzContentSHA256Mismatch": (400, "The provided 'x-amz-content-sha256' header does not match what was computed."),
    "InvalidChunkSizeError": (403, "Only the last chunk is allowed to have a size less than 8192 bytes"),
    "BadRequest": (400, "Bad Request"),
}


class S3Error(Exception):
    def __init__(self, code: str, message: str | None = None, **fields: str) -> None:
        status, default = CODES[code]
        super().__init__(message or default)
        self.code = code
        self.status = status
        self.message = message or default
        self.fields = fields  # extra XML elements (Key, BucketName, ...)
        self.headers: list[tuple[str, str]] = []


_BY_TYPE: list[tuple[type, str]] = [
    (blob.NoSuchBucket, "NoSuchBucket"),
    (blob.NoSuchKey, "NoSuchKey"),
    (blob.NoSuchUpload, "NoSuchUpload"),
    (blob.NoSuchAccessKey, "InvalidAccessKeyId"),
    (blob.BucketNotEmpty, "BucketNotEmpty"),
    (blob.BucketAlreadyExists, "BucketAlreadyOwnedByYou"),
    (blob.InvalidBucketName, "InvalidBucketName"),
    (blob.InvalidObjectKey, "KeyTooLongError"),
    (blob.InvalidPart, "InvalidPart"),
    (blob.InvalidPartOrder, "InvalidPartOrder"),
    (blob.EntityTooSmall, "EntityTooSmall"),
    (blob.BadDigest, "BadDigest"),
    (InvalidContentMD5, "InvalidDigest"),
    (blob.IncompleteBody, "IncompleteBody"),
    (blob.PreconditionFailed, "PreconditionFailed"),
    (InvalidInput, "InvalidArgument"),
    (Unavailable, "ServiceUnavailable"),
]


def from_blob_error(exc: CloudlessError, **fields: str) -> S3Error:
    for kind, code in _BY_TYPE:
        if isinstance(exc, kind):
            # Our own messages name the problem; keep S3's wording only where clients match on it.
            keep_default = code in ("NoSuchBucket", "NoSuchKey", "NoSuchUpload", "BucketAlreadyOwnedByYou")
            return S3Error(code, None if keep_default else exc.message, **fields)
    return S3Error("InternalError", **fields)
