"""The S3 gateway: an ASGI application over `ObjectService`.

Path-style addressing (`/bucket/key`), Signature V4 on every request (header
or presigned query), S3's XML bodies and error codes. Request bodies stream
into the object service; a body whose declared SHA-256, MD5 or checksum does
not match fails before the manifest is stored, so nothing becomes visible.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import secrets
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

import trio

from cloudless.blobs.errors import BucketAlreadyExists, NoSuchAccessKey, single_error
from cloudless.blobs.manifest import ObjectManifest, validate_bucket_name, validate_object_key
from cloudless.blobs.objects import ObjectService, parse_content_md5
from cloudless.blobs.s3 import sigv2, sigv4
from cloudless.blobs.s3.chunked import ChunkedDecoder
from cloudless.blobs.s3.errors import S3Error, from_blob_error
from cloudless.blobs.s3.xmlbody import document, el, error_document, iso8601, parse
from cloudless.errors import CloudlessError

log = logging.getLogger(__name__)

MAX_KEYS = 1000
_DRAIN_LIMIT = 64 << 20
_DRAIN_SECONDS = 10.0
MAX_METADATA_BYTES = 2048
_BODY_BLOCK = 4 << 20
_SUBRESOURCES_NOT_IMPLEMENTED = {
    "acl",
    "policy",
    "cors",
    "lifecycle",
    "tagging",
    "versioning",
    "website",
    "logging",
    "notification",
    "replication",
    "encryption",
    "object-lock",
    "retention",
    "legal-hold",
    "torrent",
    "restore",
    "select",
    "versions",
    "accelerate",
    "analytics",
    "inventory",
    "metrics",
    "ownershipControls",
    "publicAccessBlock",
    "requestPayment",
    "intelligent-tiering",
    "attributes",
}


@dataclass
class Request:
    method: str
    raw_path: str
    bucket: str
    key: str
    query: list[tuple[str, str]]
    params: dict[str, str]
    headers: dict[str, str]
    receive: Callable[[], Awaitable[dict]]
    request_id: str
    owner: str = ""
    signed: sigv4.SignedRequest | None = None
    body_done: bool = False


@dataclass
class ObjectBody:
    """An object (range) streamed with read-ahead: `ObjectService.copy_range` into the response."""

    service: ObjectService
    manifest: ObjectManifest
    first: int
    last: int


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | ObjectBody = b""


def _parse_query(raw: bytes) -> list[tuple[str, str]]:
    out = []
    for part in raw.decode("latin-1").split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.append((unquote(k), unquote(v)))
    return out


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _parse_http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp() if parsed is not None else None


def _etag(value: str) -> str:
    return f'"{value}"'


def _object_headers(m: ObjectManifest) -> list[tuple[str, str]]:
    headers = [
        ("etag", _etag(m.etag)),
        ("last-modified", _http_date(m.created)),
        ("content-type", m.content_type),
        ("accept-ranges", "bytes"),
    ]
    headers.extend((f"x-amz-meta-{k}", v) for k, v in sorted(m.metadata.items()))
    if m.part_count:
        headers.append(("x-amz-mp-parts-count", str(m.part_count)))
    return headers


def _user_metadata(headers: dict[str, str]) -> dict[str, str]:
    meta = {k[len("x-amz-meta-") :]: v for k, v in headers.items() if k.startswith("x-amz-meta-")}
    if sum(len(k) + len(v) for k, v in meta.items()) > MAX_METADATA_BYTES:
        raise S3Error("MetadataTooLarge")
    return meta


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive; None when the header is to be ignored (RFC 9110 §14.2:
    an invalid or multi-range header is ignored by S3); S3Error InvalidRange when unsatisfiable."""
    if not value.startswith("bytes=") or "," in value:
        return None
    first_text, sep, last_text = value[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if first_text == "":
            n = int(last_text)
            if n <= 0:
                raise S3Error("InvalidRange")
            first, last = max(size - n, 0), size - 1
        else:
            first = int(first_text)
            last = int(last_text) if last_text else size - 1
            if last < first:
                return None
            last = min(last, size - 1)
    except ValueError:
        return None
    if first >= size or size == 0:
        err = S3Error("InvalidRange")
        err.fields["ActualObjectSize"] = str(size)
        err.headers.append(("content-range", f"bytes */{size}"))
        raise err
    return first, last


class S3Gateway:
    """ASGI app. `clock` is the gateway's time for the SigV4 date window."""

    def __init__(
        self,
        service: ObjectService,
        *,
        region: str = "us-east-1",
        domains: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
        body_idle_timeout: float = 60.0,
    ) -> None:
        self.service = service
        self.body_idle_timeout = body_idle_timeout  # an upload that sends nothing this long fails
        self.region = region
        # Virtual-hosted-style requests (`<bucket>.<domain>`) for these domains; path style always works.
        self.domains = tuple(d.lower().strip(".") for d in domains)
        self.clock = clock
        self._stats: Counter[str] = Counter()

    def statistics(self) -> dict[str, int]:
        """Requests served, by outcome (`status.<code>`, `error.<S3 code>`) and body encoding."""
        return dict(self._stats)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request_id = secrets.token_hex(8).upper()
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        path = unquote(raw_path)
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            n = name.decode("latin-1").lower()
            v = value.decode("latin-1")
            headers[n] = f"{headers[n]},{v}" if n in headers else v
        virtual_bucket = self._virtual_bucket(headers.get("host", ""))
        if virtual_bucket is not None:
            bucket, key = virtual_bucket, path.lstrip("/")
        else:
            bucket, _, key = path.lstrip("/").partition("/")
        query = _parse_query(scope.get("query_string", b""))
        request = Request(
            method=scope["method"],
            raw_path=raw_path,
            bucket=bucket,
            key=key,
            query=query,
            params=dict(query),
            headers=headers,
            receive=receive,
            request_id=request_id,
        )
        try:
            try:
                await self._authenticate(request)
                response = await self._dispatch(request)
            except BaseExceptionGroup as group:
                raise single_error(group) from None
        except S3Error as exc:
            response = self._error(request, exc)
        except CloudlessError as exc:
            response = self._error(request, from_blob_error(exc, **self._resource_fields(request)))
        except Exception:
            log.exception("s3.internal_error", extra={"request_id": request_id, "path": raw_path})
            response = self._error(request, S3Error("InternalError"))
        if response.status >= 300 and not request.body_done:
            await self._drain(request)
        self._stats["requests"] += 1
        self._stats[f"status.{response.status}"] += 1
        await self._send(request, response, send)

    async def _drain(self, request: Request) -> None:
        """Read what is left of a body we refused, so the client (often waiting on
        `Expect: 100-continue`) reads our error instead of a reset connection."""
        budget = _DRAIN_LIMIT
        with trio.move_on_after(_DRAIN_SECONDS):
            while budget > 0 and not request.body_done:
                message = await request.receive()
                budget -= len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    request.body_done = True

    # plumbing ------------------------------------------------------------------

    def _virtual_bucket(self, host: str) -> str | None:
        name = host.rsplit(":", 1)[0].lower() if not host.startswith("[") else ""
        for domain in self.domains:
            if name.endswith("." + domain):
                return name[: -len(domain) - 1]
        return None

    def _resource_fields(self, request: Request) -> dict[str, str]:
        fields = {}
        if request.bucket:
            fields["BucketName"] = request.bucket
        if request.key:
            fields["Key"] = request.key
        return fields

    def _error(self, request: Request, exc: S3Error) -> Response:
        self._stats[f"error.{exc.code}"] += 1
        if exc.status >= 500:
            log.warning("s3.error", extra={"code": exc.code, "request_id": request.request_id})
        headers = [("content-type", "application/xml"), *exc.headers]
        if exc.status == 304 or request.method == "HEAD":
            return Response(exc.status, [h for h in headers if h[0] != "content-type"], b"")
        body = error_document(exc.code, exc.message, request.request_id, request.raw_path, exc.fields)
        return Response(exc.status, headers, body)

    async def _send(self, request: Request, response: Response, send: Callable) -> None:
        headers = [
            ("x-amz-request-id", request.request_id),
            ("x-amz-id-2", request.request_id),
            ("server", "Cloudless"),
            *response.headers,
        ]
        body = response.body
        if isinstance(body, bytes):
            if not any(h[0] == "content-length" for h in headers):
                headers.append(("content-length", str(len(body))))
            await send(_start(response.status, headers))
            send_body = body if request.method != "HEAD" else b""
            await send({"type": "http.response.body", "body": send_body, "more_body": False})
            return
        await send(_start(response.status, headers))

        async def piece_out(piece: bytes) -> None:
            # A client that stops reading is dropped (the raise aborts the response).
            with trio.fail_after(self.body_idle_timeout):
                await send({"type": "http.response.body", "body": piece, "more_body": True})

        await body.service.copy_range(body.manifest, piece_out, body.first, body.last)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _secret_for(self, access_key: str) -> tuple[str, str]:
        try:
            key = await self.service.metadata.get_access_key(access_key)
        except NoSuchAccessKey:
            err = S3Error("InvalidAccessKeyId")
            err.fields["AWSAccessKeyId"] = access_key
            raise err from None
        return key.secret_key, key.owner

    async def _authenticate(self, request: Request) -> None:
        if sigv2.is_sigv2(request.headers, request.query):
            access_key = sigv2.access_key_of(request.headers, request.query)
            if access_key is None:
                raise S3Error("AccessDenied")
            secret, owner = await self._secret_for(access_key)
            sigv2.verify(
                method=request.method,
                raw_path=request.raw_path,
                query=request.query,
                headers=request.headers,
                secret=secret,
                now=self.clock(),
                parse_http_date=_parse_http_date,
            )
            request.owner = owner
            return
        access_key = sigv4.access_key_of(request.headers, request.query)
        if access_key is None:
            raise S3Error("AccessDenied")
        secret, owner = await self._secret_for(access_key)
        request.signed = sigv4.verify(
            method=request.method,
            raw_path=request.raw_path,
            query=request.query,
            headers=request.headers,
            secret_for=lambda _: secret,
            now=self.clock(),
        )
        request.owner = owner

    # bodies --------------------------------------------------------------------

    def _declared_length(self, request: Request) -> int | None:
        h = request.headers
        text = h.get("x-amz-decoded-content-length") if self._is_chunked(request) else h.get("content-length")
        if text is None:
            if "transfer-encoding" in h:
                return None
            raise S3Error("MissingContentLength")
        try:
            n = int(text)
        except ValueError:
            raise S3Error("InvalidArgument", "Content-Length must be an integer") from None
        if n < 0:
            raise S3Error("InvalidArgument", "Content-Length must not be negative")
        if n > 5 << 40:
            raise S3Error("EntityTooLarge")
        return n

    def _is_chunked(self, request: Request) -> bool:
        payload = request.signed.payload_hash if request.signed else ""
        return payload.startswith("STREAMING-") or "aws-chunked" in request.headers.get("content-encoding", "")

    async def _raw_body(self, request: Request) -> AsyncIterator[bytes]:
        while True:
            with trio.move_on_after(self.body_idle_timeout) as idle:
                message = await request.receive()
            if idle.cancelled_caught:
                request.body_done = True  # nothing more will be read: do not drain
                raise S3Error("RequestTimeout")
            if message["type"] == "http.disconnect":
                request.body_done = True
                raise S3Error("IncompleteBody", "the client disconnected during the upload")
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                request.body_done = True
                return

    async def body(self, request: Request) -> AsyncIterator[bytes]:
        """The decoded request body in blocks, every declared checksum verified at its end."""
        signed = request.signed
        payload = signed.payload_hash if signed else sigv4.UNSIGNED_PAYLOAD
        decoder = None
        if self._is_chunked(request):
            signed_chunks = payload in (sigv4.STREAMING_SIGNED, sigv4.STREAMING_SIGNED_TRAILER)
            decoder = ChunkedDecoder(signed if signed_chunks else None)
            self._stats["body.aws_chunked"] += 1
        sha = hashlib.sha256() if len(payload) == 64 else None
        checksums = _Checksums(request.headers)
        pending: list[bytes] = []
        pending_len = 0
        async for raw in self._raw_body(request):
            pieces = decoder.feed(raw) if decoder else [raw]
            for piece in pieces:
                if sha is not None:
                    sha.update(piece)
                checksums.update(piece)
                pending.append(piece)
                pending_len += len(piece)
            if pending_len >= _BODY_BLOCK:
                yield b"".join(pending)
                pending, pending_len = [], 0
        if decoder is not None:
            decoder.finish()
            checksums.add_trailers(decoder.trailers)
        if sha is not None and sha.hexdigest() != payload:
            raise S3Error("XAmzContentSHA256Mismatch")
        checksums.verify()
        if pending:
            yield b"".join(pending)

    async def _small_body(self, request: Request) -> bytes:
        data = b""
        async for piece in self.body(request):
            data += piece
            if len(data) > 2 << 20:
                raise S3Error("MalformedXML" if request.method == "POST" else "EntityTooLarge")
        return data

    def _content_md5(self, request: Request) -> bytes | None:
        value = request.headers.get("content-md5")
        return None if value is None else parse_content_md5(value)

    # dispatch ------------------------------------------------------------------

    async def _dispatch(self, request: Request) -> Response:
        m, p = request.method, request.params
        for name in p:
            if name in _SUBRESOURCES_NOT_IMPLEMENTED:
                raise S3Error("NotImplemented", f"the {name} subresource is not implemented")
        if not request.bucket:
            if m == "GET":
                return await self.list_buckets(request)
            raise S3Error("MethodNotAllowed")
        validate_bucket_name(request.bucket)
        if not request.key:
            if m == "PUT":
                return await self.create_bucket(request)
            if m == "HEAD":
                await self.service.head_bucket(request.bucket)
                return Response(200, [("x-amz-bucket-region", self.region)])
            if m == "DELETE":
                await self.service.delete_bucket(request.bucket)
                return Response(204)
            if m == "GET":
                if "location" in p:
                    await self.service.head_bucket(request.bucket)
                    return Response(
                        200,
                        [("content-type", "application/xml")],
                        document("LocationConstraint", [] if self.region == "us-east-1" else [self.region]),
                    )
                if "uploads" in p:
                    return await self.list_uploads(request)
                if p.get("list-type") == "2":
                    return await self.list_objects(request, v2=True)
                return await self.list_objects(request, v2=False)
            if m == "POST" and "delete" in p:
                return await self.delete_objects(request)
            raise S3Error("MethodNotAllowed")
        validate_object_key(request.key)
        if m == "PUT":
            if "uploadId" in p or "partNumber" in p:
                if "x-amz-copy-source" in request.headers:
                    raise S3Error("NotImplemented", "UploadPartCopy is not implemented")
                return await self.upload_part(request)
            if "x-amz-copy-source" in request.headers:
                return await self.copy_object(request)
            return await self.put_object(request)
        if m in ("GET", "HEAD"):
            if "uploadId" in p and m == "GET":
                return await self.list_parts(request)
            return await self.get_object(request)
        if m == "DELETE":
            if "uploadId" in p:
                await self.service.get_upload(p["uploadId"], request.bucket, request.key)
                await self.service.abort_multipart(p["uploadId"])
                return Response(204)
            await self.service.head_bucket(request.bucket)
            await self.service.delete_object(request.bucket, request.key)
            return Response(204)
        if m == "POST":
            if "uploads" in p:
                return await self.create_multipart(request)
            if "uploadId" in p:
                return await self.complete_multipart(request)
        raise S3Error("MethodNotAllowed")

    # buckets -------------------------------------------------------------------

    async def list_buckets(self, request: Request) -> Response:
        buckets = await self.service.list_buckets()
        parts = [
            "<Owner>" + el("ID", request.owner) + el("DisplayName", request.owner) + "</Owner>",
            "<Buckets>",
            *(
                "<Bucket>" + el("Name", b.name) + el("CreationDate", iso8601(b.created)) + "</Bucket>"
                for b in sorted(buckets, key=lambda b: b.name)
            ),
            "</Buckets>",
        ]
        return _xml(document("ListAllMyBucketsResult", parts))

    async def create_bucket(self, request: Request) -> Response:
        body = await self._small_body(request)
        if body.strip():
            root = parse(body)
            if root.tag != "CreateBucketConfiguration":
                raise S3Error("MalformedXML")
        try:
            await self.service.create_bucket(request.bucket, owner=request.owner)
        except CloudlessError as exc:
            if isinstance(exc, BucketAlreadyExists):
                existing = await self.service.head_bucket(request.bucket)
                code = "BucketAlreadyOwnedByYou" if existing.owner == request.owner else "BucketAlreadyExists"
                raise S3Error(code, BucketName=request.bucket) from None
            raise
        return Response(200, [("location", f"/{request.bucket}")])

    # listing -------------------------------------------------------------------

    async def list_objects(self, request: Request, v2: bool) -> Response:
        p = request.params
        prefix = p.get("prefix", "")
        delimiter = p.get("delimiter", "")
        encoding = p.get("encoding-type")
        if encoding not in (None, "url"):
            raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
        try:
            max_keys = int(p.get("max-keys", MAX_KEYS))
        except ValueError:
            raise S3Error("InvalidArgument", "Provided max-keys not an integer or within integer range") from None
        if max_keys < 0:
            raise S3Error("InvalidArgument", "Argument maxKeys must be an integer between 0 and 2147483647")
        max_keys = min(max_keys, MAX_KEYS)
        if v2:
            token = p.get("continuation-token")
            if token is not None:
                marker = _decode_token(token)
            else:
                marker = p.get("start-after", "")
        else:
            marker = p.get("marker", "")
        page = await self.service.list_objects(request.bucket, prefix, delimiter, marker, max_keys)

        def enc(value: str) -> str:
            return quote(value, safe="/") if encoding == "url" else value

        parts = [el("Name", request.bucket), el("Prefix", enc(prefix))]
        if v2:
            if "continuation-token" in p:
                parts.append(el("ContinuationToken", p["continuation-token"]))
            if "start-after" in p:
                parts.append(el("StartAfter", enc(p["start-after"])))
            parts.append(el("KeyCount", len(page.objects) + len(page.prefixes)))
            if page.truncated and page.next_marker is not None:
                parts.append(el("NextContinuationToken", _encode_token(page.next_marker)))
        else:
            parts.append(el("Marker", enc(marker)))
            if page.truncated and page.next_marker is not None:
                parts.append(el("NextMarker", enc(page.next_marker)))
        parts.append(el("MaxKeys", max_keys))
        if delimiter:
            parts.append(el("Delimiter", enc(delimiter)))
        if encoding:
            parts.append(el("EncodingType", encoding))
        parts.append(el("IsTruncated", page.truncated))
        fetch_owner = not v2 or p.get("fetch-owner") == "true"
        for o in page.objects:
            owner = (
                ("<Owner>" + el("ID", request.owner) + el("DisplayName", request.owner) + "</Owner>")
                if fetch_owner
                else ""
            )
            parts.append(
                "<Contents>"
                + el("Key", enc(o.key))
                + el("LastModified", iso8601(o.created))
                + el("ETag", _etag(o.etag))
                + el("Size", o.size)
                + owner
                + el("StorageClass", "STANDARD")
                + "</Contents>"
            )
        for cp in page.prefixes:
            parts.append("<CommonPrefixes>" + el("Prefix", enc(cp)) + "</CommonPrefixes>")
        return _xml(document("ListBucketResult", parts))

    # objects -------------------------------------------------------------------

    async def put_object(self, request: Request) -> Response:
        await self.service.head_bucket(request.bucket)
        length = self._declared_length(request)
        md5 = self._content_md5(request)
        meta = _user_metadata(request.headers)
        expected_version = await self._write_condition(request)
        manifest = await self.service.put_object(
            request.bucket,
            request.key,
            self.body(request),
            content_type=request.headers.get("content-type", "binary/octet-stream"),
            metadata=meta,
            content_md5=md5,
            expected_size=length,
            expected_version=expected_version,
        )
        return Response(200, [("etag", _etag(manifest.etag)), *_checksum_echo(request.headers)])

    async def _write_condition(self, request: Request) -> int | None:
        """Conditional PUT (If-None-Match: * / If-Match: etag) as a compare-and-set on the
        manifest version: the check and the write are one atomic step in the metadata store."""
        if_none, if_match = request.headers.get("if-none-match"), request.headers.get("if-match")
        if if_none is not None:
            if if_none.strip() != "*":
                raise S3Error("NotImplemented", "If-None-Match on PUT supports only *")
            return 0
        if if_match is not None:
            try:
                current = await self.service.head_object(request.bucket, request.key)
            except CloudlessError as exc:
                if exc.code == "no_such_key":
                    raise S3Error("NoSuchKey", Key=request.key) from None
                raise
            if not _etag_matches(if_match, current.etag):
                raise S3Error("PreconditionFailed", Condition="If-Match")
            return current.version
        return None

    async def copy_object(self, request: Request) -> Response:
        source = unquote(request.headers["x-amz-copy-source"]).lstrip("/")
        src_bucket, _, src_key = source.partition("/")
        src_key = src_key.split("?versionId=")[0]
        if not src_bucket or not src_key:
            raise S3Error(
                "InvalidArgument", "Copy Source must mention the source bucket and key: sourcebucket/sourcekey"
            )
        await self.service.head_bucket(request.bucket)
        src = await self.service.head_object(src_bucket, src_key)
        self._check_conditions(request, src, prefix="x-amz-copy-source-")
        directive = request.headers.get("x-amz-metadata-directive", "COPY")
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown metadata directive.")
        if directive == "COPY" and (src_bucket, src_key) == (request.bucket, request.key):
            raise S3Error(
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to itself without changing "
                "the object's metadata, storage class, website redirect location or encryption attributes.",
            )
        meta = src.metadata if directive == "COPY" else _user_metadata(request.headers)
        ctype = src.content_type if directive == "COPY" else request.headers.get("content-type", src.content_type)
        new = ObjectManifest(
            bucket=request.bucket,
            key=request.key,
            size=src.size,
            etag=src.etag,
            content_type=ctype,
            metadata=dict(meta),
            chunks=list(src.chunks),
            version=0,
            created=self.service.clock(),
            part_count=src.part_count,
        )
        stored = await self.service.metadata.put_manifest(new)
        body = document(
            "CopyObjectResult", [el("LastModified", iso8601(stored.created)), el("ETag", _etag(stored.etag))]
        )
        return _xml(body)

    def _check_conditions(self, request: Request, m: ObjectManifest, prefix: str = "") -> None:
        """RFC 7232 §6 order, as S3 applies it: If-Match, then If-Unmodified-Since (412);
        If-None-Match, then If-Modified-Since (304 for GET/HEAD)."""
        h = request.headers
        modified = int(m.created)
        if_match = h.get(prefix + "if-match")
        if if_match is not None:
            if not _etag_matches(if_match, m.etag):
                raise S3Error("PreconditionFailed", Condition="If-Match")
        else:
            since = h.get(prefix + "if-unmodified-since")
            ts = _parse_http_date(since) if since else None
            if ts is not None and modified > ts:
                raise S3Error("PreconditionFailed", Condition="If-Unmodified-Since")
        if_none = h.get(prefix + "if-none-match")
        not_modified = S3Error("PreconditionFailed" if prefix else "NotModified")
        if not prefix:
            not_modified.headers.extend([("etag", _etag(m.etag)), ("last-modified", _http_date(m.created))])
        if if_none is not None:
            if _etag_matches(if_none, m.etag):
                raise not_modified
        else:
            since = h.get(prefix + "if-modified-since")
            ts = _parse_http_date(since) if since else None
            if ts is not None and modified <= ts and ts <= self.clock():
                raise not_modified

    async def get_object(self, request: Request) -> Response:
        m = await self.service.head_object(request.bucket, request.key)
        self._check_conditions(request, m)
        headers = _object_headers(m)
        for name, header in (
            ("response-content-type", "content-type"),
            ("response-content-disposition", "content-disposition"),
            ("response-cache-control", "cache-control"),
            ("response-content-encoding", "content-encoding"),
            ("response-content-language", "content-language"),
            ("response-expires", "expires"),
        ):
            if name in request.params:
                headers = [h for h in headers if h[0] != header] + [(header, request.params[name])]
        if "partNumber" in request.params:
            raise S3Error("NotImplemented", "GET with partNumber is not implemented")
        rng = request.headers.get("range")
        span = parse_range(rng, m.size) if rng else None
        if span is None:
            headers.append(("content-length", str(m.size)))
            status, first, last = 200, 0, m.size - 1
        else:
            first, last = span
            headers.append(("content-length", str(last - first + 1)))
            headers.append(("content-range", f"bytes {first}-{last}/{m.size}"))
            status = 206
        if request.method == "HEAD" or m.size == 0:
            return Response(status, headers, b"")
        return Response(status, headers, ObjectBody(self.service, m, first, last))

    async def delete_objects(self, request: Request) -> Response:
        body = await self._small_body(request)
        root = parse(body)
        if root.tag != "Delete":
            raise S3Error("MalformedXML")
        quiet = (root.findtext("Quiet") or "").strip().lower() == "true"
        objects = root.findall("Object")
        if not objects or len(objects) > 1000:
            raise S3Error("MalformedXML")
        if "content-md5" in request.headers and self._content_md5(request) != hashlib.md5(body).digest():
            raise S3Error("BadDigest")
        await self.service.head_bucket(request.bucket)
        parts = []
        for obj in objects:
            key = obj.findtext("Key")
            if key is None:
                raise S3Error("MalformedXML")
            try:
                validate_object_key(key)
                await self.service.delete_object(request.bucket, key)
                if not quiet:
                    parts.append("<Deleted>" + el("Key", key) + "</Deleted>")
            except CloudlessError as exc:
                err = from_blob_error(exc)
                parts.append(
                    "<Error>" + el("Key", key) + el("Code", err.code) + el("Message", err.message) + "</Error>"
                )
        return _xml(document("DeleteResult", parts))

    # multipart -----------------------------------------------------------------

    async def create_multipart(self, request: Request) -> Response:
        upload = await self.service.create_multipart(
            request.bucket,
            request.key,
            content_type=request.headers.get("content-type", "binary/octet-stream"),
            metadata=_user_metadata(request.headers),
        )
        return _xml(
            document(
                "InitiateMultipartUploadResult",
                [el("Bucket", upload.bucket), el("Key", upload.key), el("UploadId", upload.upload_id)],
            )
        )

    async def upload_part(self, request: Request) -> Response:
        p = request.params
        if "uploadId" not in p or "partNumber" not in p:
            raise S3Error("InvalidRequest", "UploadPart needs both uploadId and partNumber")
        try:
            number = int(p["partNumber"])
        except ValueError:
            raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive") from None
        if not 1 <= number <= 10000:
            raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
        await self.service.get_upload(p["uploadId"], request.bucket, request.key)
        length = self._declared_length(request)
        part = await self.service.upload_part(
            p["uploadId"], number, self.body(request), content_md5=self._content_md5(request), expected_size=length
        )
        return Response(200, [("etag", _etag(part.etag)), *_checksum_echo(request.headers)])

    async def complete_multipart(self, request: Request) -> Response:
        upload_id = request.params["uploadId"]
        await self.service.get_upload(upload_id, request.bucket, request.key)
        root = parse(await self._small_body(request))
        if root.tag != "CompleteMultipartUpload":
            raise S3Error("MalformedXML")
        parts = []
        for part in root.findall("Part"):
            try:
                number = int((part.findtext("PartNumber") or "").strip())
            except ValueError:
                raise S3Error("MalformedXML") from None
            parts.append((number, (part.findtext("ETag") or "").strip()))
        if not parts:
            raise S3Error("MalformedXML")
        manifest = await self.service.complete_multipart(upload_id, parts)
        return _xml(
            document(
                "CompleteMultipartUploadResult",
                [
                    el("Location", f"/{manifest.bucket}/{quote(manifest.key)}"),
                    el("Bucket", manifest.bucket),
                    el("Key", manifest.key),
                    el("ETag", _etag(manifest.etag)),
                ],
            )
        )

    async def list_parts(self, request: Request) -> Response:
        upload_id = request.params["uploadId"]
        upload = await self.service.get_upload(upload_id, request.bucket, request.key)
        try:
            max_parts = min(int(request.params.get("max-parts", 1000)), 1000)
            marker = int(request.params.get("part-number-marker", 0))
        except ValueError:
            raise S3Error("InvalidArgument", "max-parts and part-number-marker must be integers") from None
        if max_parts < 0:
            raise S3Error("InvalidArgument", "max-parts must not be negative")
        parts = [pt for pt in await self.service.list_parts(upload_id) if pt.part_number > marker]
        shown, truncated = parts[:max_parts], len(parts) > max_parts
        out = [
            el("Bucket", upload.bucket),
            el("Key", upload.key),
            el("UploadId", upload_id),
            el("PartNumberMarker", marker),
            el("NextPartNumberMarker", shown[-1].part_number if shown else 0),
            el("MaxParts", max_parts),
            el("IsTruncated", truncated),
            el("StorageClass", "STANDARD"),
        ]
        out.extend(
            "<Part>"
            + el("PartNumber", pt.part_number)
            + el("LastModified", iso8601(pt.last_modified))
            + el("ETag", _etag(pt.etag))
            + el("Size", pt.size)
            + "</Part>"
            for pt in shown
        )
        return _xml(document("ListPartsResult", out))

    async def list_uploads(self, request: Request) -> Response:
        p = request.params
        prefix = p.get("prefix", "")
        try:
            max_uploads = min(int(p.get("max-uploads", 1000)), 1000)
        except ValueError:
            raise S3Error("InvalidArgument", "max-uploads must be an integer") from None
        key_marker, id_marker = p.get("key-marker", ""), p.get("upload-id-marker", "")
        uploads = [
            u
            for u in await self.service.list_uploads(request.bucket)
            if u.key.startswith(prefix)
            and (
                not key_marker or (u.key, u.upload_id if id_marker else "\uffff") > (key_marker, id_marker or "\uffff")
            )
        ]
        shown, truncated = uploads[:max_uploads], len(uploads) > max_uploads
        out = [
            el("Bucket", request.bucket),
            el("KeyMarker", key_marker),
            el("UploadIdMarker", id_marker),
            el("NextKeyMarker", shown[-1].key if truncated and shown else ""),
            el("NextUploadIdMarker", shown[-1].upload_id if truncated and shown else ""),
            el("Prefix", prefix),
            el("MaxUploads", max_uploads),
            el("IsTruncated", truncated),
        ]
        out.extend(
            "<Upload>"
            + el("Key", u.key)
            + el("UploadId", u.upload_id)
            + "<Initiator>"
            + el("ID", request.owner)
            + el("DisplayName", request.owner)
            + "</Initiator>"
            + "<Owner>"
            + el("ID", request.owner)
            + el("DisplayName", request.owner)
            + "</Owner>"
            + el("StorageClass", "STANDARD")
            + el("Initiated", iso8601(u.initiated))
            + "</Upload>"
            for u in shown
        )
        return _xml(document("ListMultipartUploadsResult", out))


def _start(status: int, headers: list[tuple[str, str]]) -> dict:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers],
    }


def _xml(body: bytes) -> Response:
    return Response(200, [("content-type", "application/xml")], body)


def _encode_token(marker: str) -> str:
    return base64.urlsafe_b64encode(marker.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect") from None


def _etag_matches(header: str, etag: str) -> bool:
    candidates = [c.strip().removeprefix("W/").strip('"') for c in header.split(",")]
    return "*" in candidates or etag in candidates


class _Checksums:
    """x-amz-checksum-* values (headers or aws-chunked trailers) we can verify: CRC32, SHA-1, SHA-256."""

    def __init__(self, headers: dict[str, str]) -> None:
        self._crc32 = 0
        self._sha1 = hashlib.sha1()
        self._sha256 = hashlib.sha256()
        self.expected = {
            k: v for k, v in headers.items() if k.startswith("x-amz-checksum-") and k != "x-amz-checksum-mode"
        }
        trailer = headers.get("x-amz-trailer", "")
        self._wanted = set(self.expected) | {t.strip().lower() for t in trailer.split(",") if t.strip()}

    def update(self, data: bytes) -> None:
        if "x-amz-checksum-crc32" in self._wanted:
            self._crc32 = zlib.crc32(data, self._crc32)
        if "x-amz-checksum-sha1" in self._wanted:
            self._sha1.update(data)
        if "x-amz-checksum-sha256" in self._wanted:
            self._sha256.update(data)

    def add_trailers(self, trailers: dict[str, str]) -> None:
        self.expected.update({k: v for k, v in trailers.items() if k.startswith("x-amz-checksum-")})

    def verify(self) -> None:
        actual = {
            "x-amz-checksum-crc32": lambda: base64.b64encode(self._crc32.to_bytes(4, "big")).decode(),
            "x-amz-checksum-sha1": lambda: base64.b64encode(self._sha1.digest()).decode(),
            "x-amz-checksum-sha256": lambda: base64.b64encode(self._sha256.digest()).decode(),
        }
        for name, value in self.expected.items():
            compute = actual.get(name)
            if compute is not None and compute() != value:
                algorithm = name.removeprefix("x-amz-checksum-").upper()
                raise S3Error("BadDigest", f"The {algorithm} you specified did not match the calculated checksum.")


def _checksum_echo(headers: dict[str, str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.startswith("x-amz-checksum-") and k != "x-amz-checksum-mode"]


__all__ = ["S3Gateway", "parse_range"]
