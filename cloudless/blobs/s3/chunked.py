"""Decoding `Content-Encoding: aws-chunked` request bodies (sans-IO).

SDKs send these for streaming SigV4 (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`,
each chunk signed, chained from the request signature) and for trailing
checksums (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`, what current botocore uses
for PutObject/UploadPart over TLS). Framing:

    <hex size>[;chunk-signature=<sig>]\\r\\n<data>\\r\\n ... 0[;...]\\r\\n
    [<trailer>:<value>\\r\\n ...]\\r\\n
"""

from __future__ import annotations

import hashlib

from cloudless.blobs.s3.errors import S3Error
from cloudless.blobs.s3.sigv4 import SignedRequest, chunk_signature, trailer_signature

MAX_LINE = 4096
MAX_CHUNK = 64 << 20


class ChunkedDecoder:
    def __init__(self, signed_by: SignedRequest | None = None) -> None:
        self._buf = bytearray()
        self._state = "size"
        self._remaining = 0
        self._signed = signed_by
        self._previous = signed_by.signature if signed_by else ""
        self._chunk_sig = ""
        self._chunk_hash = hashlib.sha256() if signed_by else None
        self.trailers: dict[str, str] = {}
        self._trailer_lines: list[str] = []

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            if self._state == "size":
                line = self._line()
                if line is None:
                    break
                size_text, _, ext = line.partition(";")
                try:
                    self._remaining = int(size_text, 16)
                except ValueError:
                    raise S3Error("IncompleteBody", "malformed aws-chunked chunk size") from None
                if not 0 <= self._remaining <= MAX_CHUNK:
                    raise S3Error("InvalidArgument", "aws-chunked chunk too large")
                if self._signed is not None:
                    name, _, sig = ext.partition("=")
                    if name != "chunk-signature" or not sig:
                        raise S3Error("SignatureDoesNotMatch", "aws-chunked chunk is missing its signature")
                    self._chunk_sig = sig
                    self._chunk_hash = hashlib.sha256()
                if self._remaining == 0:
                    self._verify_chunk()
                    self._state = "trailer"
                else:
                    self._state = "data"
            elif self._state == "data":
                if not self._buf:
                    break
                take = bytes(self._buf[: self._remaining])
                del self._buf[: len(take)]
                self._remaining -= len(take)
                if self._chunk_hash is not None:
                    self._chunk_hash.update(take)
                out.append(take)
                if self._remaining == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise S3Error("IncompleteBody", "aws-chunked chunk is not followed by CRLF")
                del self._buf[:2]
                self._verify_chunk()
                self._state = "size"
            elif self._state == "trailer":
                line = self._line()
                if line is None:
                    break
                if line == "":
                    self._check_trailer_signature()
                    self._state = "done"
                    continue
                name, sep, value = line.partition(":")
                if not sep:
                    raise S3Error("IncompleteBody", "malformed aws-chunked trailer")
                if name.strip().lower() == "x-amz-trailer-signature":
                    self._trailer_sig = value.strip()
                else:
                    self._trailer_lines.append(f"{name.strip().lower()}:{value.strip()}\n")
                    self.trailers[name.strip().lower()] = value.strip()
            else:  # done
                if self._buf.strip():
                    raise S3Error("IncompleteBody", "data after the end of the aws-chunked body")
                self._buf.clear()
                break
        return out

    def finish(self) -> None:
        if self._state != "done":
            # Some clients end without the final blank line after the zero chunk.
            if self._state == "trailer" and not self._buf:
                self._check_trailer_signature()
                self._state = "done"
                return
            raise S3Error("IncompleteBody")

    def _line(self) -> str | None:
        i = self._buf.find(b"\r\n")
        if i < 0:
            if len(self._buf) > MAX_LINE:
                raise S3Error("IncompleteBody", "aws-chunked header line too long")
            return None
        line = bytes(self._buf[:i]).decode("latin-1")
        del self._buf[: i + 2]
        return line

    def _verify_chunk(self) -> None:
        if self._signed is None or self._chunk_hash is None:
            return
        expected = chunk_signature(self._signed, self._previous, self._chunk_hash.hexdigest())
        if expected != self._chunk_sig:
            raise S3Error("SignatureDoesNotMatch", "an aws-chunked chunk signature does not match")
        self._previous = expected

    def _check_trailer_signature(self) -> None:
        sig = getattr(self, "_trailer_sig", None)
        if self._signed is None or not self._trailer_lines:
            return
        if sig is None:
            raise S3Error("SignatureDoesNotMatch", "the trailer signature is missing")
        if trailer_signature(self._signed, self._previous, "".join(self._trailer_lines)) != sig:
            raise S3Error("SignatureDoesNotMatch", "the trailer signature does not match")
