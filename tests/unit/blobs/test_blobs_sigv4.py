"""Signature V4 against the worked examples of the S3 API Reference
("Signature Calculations for the Authorization Header", "Query String
Authentication", "Transferring Payload in Multiple Chunks")."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from cloudless.blobs.s3 import sigv4
from cloudless.blobs.s3.chunked import ChunkedDecoder
from cloudless.blobs.s3.errors import S3Error

AK = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
NOW = datetime(2013, 5, 24, 0, 0, 0, tzinfo=UTC).timestamp()
SCOPE = f"{AK}/20130524/us-east-1/s3/aws4_request"


def auth(signed: str, signature: str) -> str:
    return f"AWS4-HMAC-SHA256 Credential={SCOPE},SignedHeaders={signed},Signature={signature}"


def test_get_object_example():
    headers = {
        "host": "examplebucket.s3.amazonaws.com",
        "range": "bytes=0-9",
        "x-amz-content-sha256": sigv4.EMPTY_SHA256,
        "x-amz-date": "20130524T000000Z",
        "authorization": auth(
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
    }
    signed = sigv4.verify(
        method="GET", raw_path="/test.txt", query=[], headers=headers, secret_for=lambda k: SECRET, now=NOW
    )
    assert signed.access_key == AK and not signed.presigned


def test_put_object_example_with_encoded_path():
    headers = {
        "date": "Fri, 24 May 2013 00:00:00 GMT",
        "host": "examplebucket.s3.amazonaws.com",
        "x-amz-content-sha256": "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "authorization": auth(
            "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
        ),
    }
    sigv4.verify(
        method="PUT", raw_path="/test%24file.text", query=[], headers=headers, secret_for=lambda k: SECRET, now=NOW
    )
    assert hashlib.sha256(b"Welcome to Amazon S3.").hexdigest() == headers["x-amz-content-sha256"]


def test_presigned_url_example_and_its_expiry():
    query = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", SCOPE),
        ("X-Amz-Date", "20130524T000000Z"),
        ("X-Amz-Expires", "86400"),
        ("X-Amz-SignedHeaders", "host"),
        ("X-Amz-Signature", "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"),
    ]
    headers = {"host": "examplebucket.s3.amazonaws.com"}
    signed = sigv4.verify(
        method="GET", raw_path="/test.txt", query=query, headers=headers, secret_for=lambda k: SECRET, now=NOW + 3600
    )
    assert signed.presigned
    with pytest.raises(S3Error) as e:
        sigv4.verify(
            method="GET",
            raw_path="/test.txt",
            query=query,
            headers=headers,
            secret_for=lambda k: SECRET,
            now=NOW + 86401,
        )
    assert e.value.code == "AccessDenied"


def test_request_outside_the_fifteen_minute_window_is_too_skewed():
    headers = {
        "host": "examplebucket.s3.amazonaws.com",
        "x-amz-content-sha256": sigv4.EMPTY_SHA256,
        "x-amz-date": "20130524T000000Z",
        "authorization": auth("host;x-amz-content-sha256;x-amz-date", "0" * 64),
    }
    with pytest.raises(S3Error) as e:
        sigv4.verify(
            method="GET", raw_path="/", query=[], headers=headers, secret_for=lambda k: SECRET, now=NOW + 16 * 60
        )
    assert e.value.code == "RequestTimeTooSkewed" and e.value.status == 403


def test_a_changed_header_breaks_the_signature():
    headers = {
        "host": "examplebucket.s3.amazonaws.com",
        "range": "bytes=0-10",
        "x-amz-content-sha256": sigv4.EMPTY_SHA256,
        "x-amz-date": "20130524T000000Z",
        "authorization": auth(
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
    }
    with pytest.raises(S3Error) as e:
        sigv4.verify(
            method="GET", raw_path="/test.txt", query=[], headers=headers, secret_for=lambda k: SECRET, now=NOW
        )
    assert e.value.code == "SignatureDoesNotMatch"


def test_unsigned_host_header_is_refused():
    headers = {
        "x-amz-content-sha256": sigv4.EMPTY_SHA256,
        "x-amz-date": "20130524T000000Z",
        "authorization": auth("x-amz-content-sha256;x-amz-date", "0" * 64),
    }
    with pytest.raises(S3Error) as e:
        sigv4.verify(method="GET", raw_path="/", query=[], headers=headers, secret_for=lambda k: SECRET, now=NOW)
    assert e.value.code == "AccessDenied"


def test_streaming_chunk_signatures_example():
    headers = {
        "content-encoding": "aws-chunked",
        "content-length": "66824",
        "host": "s3.amazonaws.com",
        "x-amz-content-sha256": sigv4.STREAMING_SIGNED,
        "x-amz-date": "20130524T000000Z",
        "x-amz-decoded-content-length": "66560",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "authorization": auth(
            "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
            "x-amz-storage-class",
            "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
        ),
    }
    signed = sigv4.verify(
        method="PUT",
        raw_path="/examplebucket/chunkObject.txt",
        query=[],
        headers=headers,
        secret_for=lambda k: SECRET,
        now=NOW,
    )
    body = (
        b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648\r\n"
        + b"a" * 65536
        + b"\r\n"
        + b"400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497\r\n"
        + b"a" * 1024
        + b"\r\n"
        + b"0;chunk-signature=b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9\r\n\r\n"
    )
    assert len(body) == 66824
    decoder = ChunkedDecoder(signed)
    out = b"".join(b"".join(decoder.feed(body[i : i + 1000])) for i in range(0, len(body), 1000))
    decoder.finish()
    assert out == b"a" * 66560
    tampered = ChunkedDecoder(signed)
    with pytest.raises(S3Error) as e:
        tampered.feed(body.replace(b"a" * 1024, b"b" + b"a" * 1023))
    assert e.value.code == "SignatureDoesNotMatch"


def test_unsigned_trailer_body_yields_data_and_trailers():
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n"
    decoder = ChunkedDecoder(None)
    out = b"".join(decoder.feed(body))
    decoder.finish()
    assert out == b"hello world" and decoder.trailers == {"x-amz-checksum-crc32": "DUoRhQ=="}


def test_truncated_chunked_body_is_incomplete():
    decoder = ChunkedDecoder(None)
    decoder.feed(b"a\r\nshort")
    with pytest.raises(S3Error) as e:
        decoder.finish()
    assert e.value.code == "IncompleteBody"


# Signature V2 (S3 Developer Guide, "Signing and authenticating REST requests", examples) -------


def _http_date(value: str):
    import email.utils

    return email.utils.parsedate_to_datetime(value).timestamp()


def test_sigv2_header_example():
    from cloudless.blobs.s3 import sigv2

    date = "Tue, 27 Mar 2007 19:36:42 +0000"
    headers = {
        "host": "johnsmith.s3.amazonaws.com",
        "date": date,
        "authorization": f"AWS {AK}:bWq2s1WEIj+Ydj0vQ697zp+IXMU=",
    }
    assert (
        sigv2.verify(
            method="GET",
            raw_path="/johnsmith/photos/puppy.jpg",
            query=[],
            headers=headers,
            secret=SECRET,
            now=_http_date(date) + 60,
            parse_http_date=_http_date,
        )
        == AK
    )
    with pytest.raises(S3Error) as e:
        sigv2.verify(
            method="GET",
            raw_path="/johnsmith/photos/kitten.jpg",
            query=[],
            headers=headers,
            secret=SECRET,
            now=_http_date(date) + 60,
            parse_http_date=_http_date,
        )
    assert e.value.code == "SignatureDoesNotMatch"


def test_sigv2_query_example_and_expiry():
    from cloudless.blobs.s3 import sigv2

    query = [("AWSAccessKeyId", AK), ("Expires", "1175139620"), ("Signature", "NpgCjnDzrM+WFzoENXmpNDUsSn8=")]
    headers = {"host": "johnsmith.s3.amazonaws.com"}
    assert (
        sigv2.verify(
            method="GET",
            raw_path="/johnsmith/photos/puppy.jpg",
            query=query,
            headers=headers,
            secret=SECRET,
            now=1175139000,
            parse_http_date=_http_date,
        )
        == AK
    )
    with pytest.raises(S3Error) as e:
        sigv2.verify(
            method="GET",
            raw_path="/johnsmith/photos/puppy.jpg",
            query=query,
            headers=headers,
            secret=SECRET,
            now=1175139621,
            parse_http_date=_http_date,
        )
    assert e.value.code == "AccessDenied"
