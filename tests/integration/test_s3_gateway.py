"""boto3 against the S3 gateway served by hypercorn over TLS (cluster-CA certificate).

Each test names the S3 behaviour it pins (Amazon S3 API Reference, the
operation's page); error cases check the exact code and HTTP status.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta

import boto3
import httpx
import pytest
import trio
from botocore.config import Config
from botocore.exceptions import ClientError

from cloudless.blobs.catalog import LocalMetadataStore
from cloudless.blobs.chunkstore import LocalChunkStore
from cloudless.blobs.objects import ObjectService
from cloudless.blobs.s3.app import S3Gateway
from cloudless.blobs.s3.server import issue_gateway_certificate, serve_gateway
from cloudless.pki.ca import ClusterCA

MIB = 1024 * 1024


class Gateway:
    def __init__(self, tmp) -> None:
        now = datetime.now(UTC)
        ca = ClusterCA.create("s3test", now)
        cert, key = issue_gateway_certificate(ca, ["127.0.0.1", "localhost"], now)
        self.ca_file = tmp / "ca.pem"
        self.ca_file.write_bytes(ca.certificate_pem)
        self.tls = ssl.create_default_context(cafile=str(self.ca_file))
        (tmp / "gw.pem").write_bytes(cert)
        (tmp / "gw.key").write_bytes(key)
        self.metadata = LocalMetadataStore(tmp / "meta")
        self.store = LocalChunkStore(tmp / "chunks")
        self.service = ObjectService(self.metadata, self.store, replication=1)
        self.app = S3Gateway(self.service)
        self.key = trio.run(self.service.create_access_key)
        self._started = threading.Event()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.thread = threading.Thread(target=trio.run, args=(self._main, tmp), daemon=True)
        self.thread.start()
        assert self._started.wait(30), "gateway did not start"

    async def _main(self, tmp) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve_gateway(
                    self.app,
                    host="127.0.0.1",
                    port=0,
                    certfile=tmp / "gw.pem",
                    keyfile=tmp / "gw.key",
                    task_status=task_status,
                )
            )
            self.endpoint = binds[0].replace("http://", "https://")
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self.thread.join(10)
        self.metadata.close()
        self.store.close()

    def client(self, access_key=None, secret_key=None, **config):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key or self.key.access_key,
            aws_secret_access_key=secret_key or self.key.secret_key,
            region_name="us-east-1",
            verify=str(self.ca_file),
            config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}, **config),
        )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = Gateway(tmp_path_factory.mktemp("s3"))
    yield gw
    gw.close()


@pytest.fixture
def s3(gateway):
    return gateway.client()


_n = 0


@pytest.fixture
def bucket(s3):
    global _n
    _n += 1
    name = f"bucket-{_n}-{os.getpid()}"
    s3.create_bucket(Bucket=name)
    return name


def error_of(exc_info) -> tuple[str, int]:
    err = exc_info.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def test_put_get_roundtrip_with_md5_etag_and_user_metadata(s3, bucket):
    body = os.urandom(3 * MIB + 17)
    put = s3.put_object(
        Bucket=bucket, Key="dir/obj.bin", Body=body, ContentType="application/x-test", Metadata={"Color": "blue"}
    )
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    got = s3.get_object(Bucket=bucket, Key="dir/obj.bin")
    assert got["Body"].read() == body
    assert got["ContentType"] == "application/x-test"
    assert got["Metadata"] == {"color": "blue"}
    assert got["ContentLength"] == len(body)
    head = s3.head_object(Bucket=bucket, Key="dir/obj.bin")
    assert head["ETag"] == put["ETag"] and head["ContentLength"] == len(body)


# Buckets (CreateBucket, ListBuckets, HeadBucket, DeleteBucket) -----------------


def test_bucket_lifecycle_and_bucket_errors(s3):
    s3.create_bucket(Bucket="life-cycle-bucket")
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert "life-cycle-bucket" in names
    s3.head_bucket(Bucket="life-cycle-bucket")
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket="life-cycle-bucket")
    assert error_of(e) == ("BucketAlreadyOwnedByYou", 409)
    s3.put_object(Bucket="life-cycle-bucket", Key="k", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="life-cycle-bucket")
    assert error_of(e) == ("BucketNotEmpty", 409)
    s3.delete_object(Bucket="life-cycle-bucket", Key="k")
    s3.delete_bucket(Bucket="life-cycle-bucket")
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket="life-cycle-bucket")
    assert error_of(e) == ("404", 404)  # HEAD has no body: botocore reports the status
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="life-cycle-bucket")
    assert error_of(e) == ("NoSuchBucket", 404)


def test_invalid_bucket_name_is_rejected(gateway, s3):
    # botocore validates names client-side; a raw signed request reaches the server.
    r = signed_request(gateway, "PUT", "/Bad_Name")
    assert r.status_code == 400
    assert b"<Code>InvalidBucketName</Code>" in r.content
    assert b"<RequestId>" in r.content


def test_operations_on_a_missing_bucket_say_no_such_bucket(s3):
    for call in (
        lambda: s3.put_object(Bucket="no-such-bucket-here", Key="k", Body=b"x"),
        lambda: s3.get_object(Bucket="no-such-bucket-here", Key="k"),
        lambda: s3.list_objects_v2(Bucket="no-such-bucket-here"),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert error_of(e) == ("NoSuchBucket", 404)


# Objects -------------------------------------------------------------------------


def test_missing_key_is_no_such_key_with_xml_error(s3, bucket):
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="missing")
    assert error_of(e) == ("NoSuchKey", 404)
    assert e.value.response["Error"]["Key"] == "missing"
    assert e.value.response["ResponseMetadata"]["RequestId"]


def test_empty_object_and_overwrite(s3, bucket):
    put = s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert put["ETag"] == '"d41d8cd98f00b204e9800998ecf8427e"'
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
    s3.put_object(Bucket=bucket, Key="empty", Body=b"now full")
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b"now full"


def test_delete_missing_key_succeeds_with_204(s3, bucket):
    r = s3.delete_object(Bucket=bucket, Key="never-existed")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 204


def test_keys_with_special_characters(s3, bucket):
    keys = ["a b/c+d", "ünï/cødé", "x%2Fy", "q?x=1&y", "tilde~/!$'()*"]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    for k in keys:
        assert s3.get_object(Bucket=bucket, Key=k)["Body"].read() == k.encode()
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(listed) == sorted(keys)


def test_delete_objects_deletes_and_reports(s3, bucket):
    for k in ("a", "b", "c"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"1")
    r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "a"}, {"Key": "b"}, {"Key": "zz"}]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["a", "b", "zz"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["c"]
    quiet = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "c"}], "Quiet": True})
    assert "Deleted" not in quiet
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_copy_object_shares_chunks_and_replaces_metadata(gateway, s3, bucket):
    body = os.urandom(2 * MIB)
    s3.put_object(Bucket=bucket, Key="src", Body=body, Metadata={"a": "1"})
    puts_before = len(list(gateway.store.digests()))
    s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"})
    assert len(list(gateway.store.digests())) == puts_before
    got = s3.get_object(Bucket=bucket, Key="dst")
    assert got["Body"].read() == body and got["Metadata"] == {"a": "1"}
    s3.copy_object(
        Bucket=bucket,
        Key="dst",
        CopySource={"Bucket": bucket, "Key": "src"},
        Metadata={"b": "2"},
        MetadataDirective="REPLACE",
    )
    assert s3.head_object(Bucket=bucket, Key="dst")["Metadata"] == {"b": "2"}


# Content-MD5 and checksums ----------------------------------------------------------


def test_content_md5_mismatch_is_bad_digest_and_stores_nothing(s3, bucket):
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="k", Body=b"content", ContentMD5=wrong)
    assert error_of(e) == ("BadDigest", 400)
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="k")
    assert error_of(e) == ("404", 404)


def test_malformed_content_md5_is_invalid_digest(s3, bucket):
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="k", Body=b"content", ContentMD5="not-base64!")
    assert error_of(e) == ("InvalidDigest", 400)


def test_correct_content_md5_is_accepted(s3, bucket):
    body = b"hello"
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    s3.put_object(Bucket=bucket, Key="k", Body=body, ContentMD5=md5)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == body


def test_trailing_checksums_of_current_sdks_are_verified(gateway, bucket):
    # botocore >= 1.36 sends aws-chunked bodies with a CRC32 trailer by default.
    client = gateway.client(request_checksum_calculation="when_supported")
    chunked_before = gateway.app.statistics().get("body.aws_chunked", 0)
    client.put_object(Bucket=bucket, Key="crc", Body=b"abc" * 1000, ChecksumAlgorithm="SHA256")
    client.put_object(Bucket=bucket, Key="crc32", Body=b"def" * 1000)  # the SDK's default: CRC32 trailer
    assert gateway.app.statistics()["body.aws_chunked"] == chunked_before + 2
    assert client.get_object(Bucket=bucket, Key="crc")["Body"].read() == b"abc" * 1000
    assert client.get_object(Bucket=bucket, Key="crc32")["Body"].read() == b"def" * 1000


def test_a_wrong_trailing_checksum_is_bad_digest(gateway, bucket):
    body = b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n"
    r = signed_request(
        gateway,
        "PUT",
        f"/{bucket}/badcrc",
        body=body,
        payload_hash="STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        extra_headers={
            "content-encoding": "aws-chunked",
            "x-amz-decoded-content-length": "5",
            "x-amz-trailer": "x-amz-checksum-crc32",
        },
    )
    assert r.status_code == 400 and b"<Code>BadDigest</Code>" in r.content
    assert gateway.call(gateway.service.metadata.list_manifests, bucket).objects == []


# Range GET -----------------------------------------------------------------------------


def test_range_get_returns_206_with_content_range(s3, bucket):
    body = os.urandom(4 * MIB + 3)
    s3.put_object(Bucket=bucket, Key="r", Body=body)
    cases = {
        "bytes=0-9": body[0:10],
        "bytes=1048570-1048600": body[1048570:1048601],
        f"bytes={len(body) - 5}-": body[-5:],
        "bytes=-7": body[-7:],
        f"bytes=10-{len(body) + 100}": body[10:],
    }
    for rng, expected in cases.items():
        got = s3.get_object(Bucket=bucket, Key="r", Range=rng)
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206, rng
        assert got["Body"].read() == expected, rng
        assert got["ContentRange"].endswith(f"/{len(body)}")


def test_unsatisfiable_range_is_416_invalid_range(s3, bucket):
    s3.put_object(Bucket=bucket, Key="r", Body=b"0123456789")
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="r", Range="bytes=10-20")
    assert error_of(e) == ("InvalidRange", 416)


def test_invalid_range_syntax_is_ignored(s3, bucket):
    s3.put_object(Bucket=bucket, Key="r", Body=b"0123456789")
    got = s3.get_object(Bucket=bucket, Key="r", Range="bytes=5-2")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200 and got["Body"].read() == b"0123456789"


# Conditional GET (RFC 7232 as S3 applies it) ------------------------------------------


def test_conditional_get(s3, bucket):
    put = s3.put_object(Bucket=bucket, Key="c", Body=b"data")
    etag = put["ETag"]
    assert s3.get_object(Bucket=bucket, Key="c", IfMatch=etag)["Body"].read() == b"data"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfMatch='"0000"')
    assert error_of(e) == ("PreconditionFailed", 412)
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfNoneMatch=etag)
    assert error_of(e) == ("304", 304)
    assert s3.get_object(Bucket=bucket, Key="c", IfNoneMatch='"0000"')["Body"].read() == b"data"
    future = datetime.now(UTC) + timedelta(seconds=5)
    past = datetime.now(UTC) - timedelta(days=1)
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfModifiedSince=datetime.now(UTC) - timedelta(seconds=0))
    assert error_of(e) == ("304", 304)
    assert s3.get_object(Bucket=bucket, Key="c", IfModifiedSince=past)["Body"].read() == b"data"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="c", IfUnmodifiedSince=past)
    assert error_of(e) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=bucket, Key="c", IfUnmodifiedSince=future)["Body"].read() == b"data"
    # If-Match true takes precedence over a failing If-Unmodified-Since.
    assert s3.get_object(Bucket=bucket, Key="c", IfMatch=etag, IfUnmodifiedSince=past)["Body"].read() == b"data"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="c", IfNoneMatch=etag)
    assert error_of(e) == ("304", 304)


# Listing -----------------------------------------------------------------------------------


@pytest.fixture
def tree(s3, bucket):
    keys = ["a.txt", "dir/x", "dir/y", "dir/sub/z", "dir2/w", "e/f/g", "zz"]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    return bucket, keys


def test_list_v2_prefix_and_delimiter(s3, tree):
    bucket, _keys = tree
    r = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["a.txt", "zz"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["dir/", "dir2/", "e/"]
    assert r["KeyCount"] == 5
    r = s3.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["dir/x", "dir/y"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["dir/sub/"]
    r = s3.list_objects_v2(Bucket=bucket, Prefix="dir")
    assert [o["Key"] for o in r["Contents"]] == ["dir/sub/z", "dir/x", "dir/y", "dir2/w"]
    assert r["Contents"][0]["Size"] == len(b"dir/sub/z")
    assert r["Contents"][0]["ETag"] == f'"{hashlib.md5(b"dir/sub/z").hexdigest()}"'


def test_list_v2_pagination_with_continuation_tokens(s3, tree):
    bucket, keys = tree
    seen, token, pages = [], None, 0
    while True:
        kwargs = {"Bucket": bucket, "MaxKeys": 2, "Delimiter": "/"}
        if token:
            kwargs["ContinuationToken"] = token
        r = s3.list_objects_v2(**kwargs)
        pages += 1
        seen += [o["Key"] for o in r.get("Contents", [])] + [p["Prefix"] for p in r.get("CommonPrefixes", [])]
        if not r["IsTruncated"]:
            break
        token = r["NextContinuationToken"]
    assert pages == 3
    assert sorted(seen) == ["a.txt", "dir/", "dir2/", "e/", "zz"]
    paginated = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 3})
        for o in page["Contents"]
    ]
    assert paginated == sorted(keys)


def test_list_v2_start_after_and_max_keys(s3, tree):
    bucket, _keys = tree
    r = s3.list_objects_v2(Bucket=bucket, StartAfter="dir/y")
    assert [o["Key"] for o in r["Contents"]] == ["dir2/w", "e/f/g", "zz"]
    r = s3.list_objects_v2(Bucket=bucket, MaxKeys=0)
    assert r["KeyCount"] == 0 and "Contents" not in r


def test_list_v2_bad_continuation_token_is_invalid_argument(s3, tree):
    bucket, _ = tree
    with pytest.raises(ClientError) as e:
        s3.list_objects_v2(Bucket=bucket, ContinuationToken="!!!not-a-token")
    assert error_of(e) == ("InvalidArgument", 400)


def test_list_v1_markers(s3, tree):
    bucket, keys = tree
    r = s3.list_objects(Bucket=bucket, MaxKeys=3)
    assert [o["Key"] for o in r["Contents"]] == sorted(keys)[:3]
    assert r["IsTruncated"]
    r2 = s3.list_objects(Bucket=bucket, Marker=r["Contents"][-1]["Key"])
    assert [o["Key"] for o in r2["Contents"]] == sorted(keys)[3:]
    r = s3.list_objects(Bucket=bucket, Delimiter="/", MaxKeys=2)
    assert r["IsTruncated"] and r["NextMarker"] == "dir/"
    r = s3.list_objects(Bucket=bucket, Delimiter="/", Marker="dir/")
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["dir2/", "e/"]
    paginated = [
        o["Key"]
        for page in s3.get_paginator("list_objects").paginate(Bucket=bucket, PaginationConfig={"PageSize": 2})
        for o in page["Contents"]
    ]
    assert paginated == sorted(keys)


# Multipart upload ---------------------------------------------------------------------


def test_multipart_upload_etag_rule_and_content(s3, bucket):
    parts_data = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(1234)]
    up = s3.create_multipart_upload(Bucket=bucket, Key="mp", ContentType="video/x-test", Metadata={"m": "v"})
    uid = up["UploadId"]
    etags = []
    for i, data in enumerate(parts_data, 1):
        r = s3.upload_part(Bucket=bucket, Key="mp", UploadId=uid, PartNumber=i, Body=data)
        assert r["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
        etags.append(r["ETag"])
    listed = s3.list_parts(Bucket=bucket, Key="mp", UploadId=uid)
    assert [(p["PartNumber"], p["Size"]) for p in listed["Parts"]] == [(1, 5 * MIB), (2, 5 * MIB), (3, 1234)]
    uploads = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [("mp", uid)]
    done = s3.complete_multipart_upload(
        Bucket=bucket,
        Key="mp",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]},
    )
    joined = b"".join(hashlib.md5(d).digest() for d in parts_data)
    assert done["ETag"] == f'"{hashlib.md5(joined).hexdigest()}-3"'
    got = s3.get_object(Bucket=bucket, Key="mp")
    assert got["Body"].read() == b"".join(parts_data)
    assert got["ContentType"] == "video/x-test" and got["Metadata"] == {"m": "v"}
    assert s3.get_object(Bucket=bucket, Key="mp", Range=f"bytes={5 * MIB - 2}-{5 * MIB + 1}")["Body"].read() == (
        parts_data[0][-2:] + parts_data[1][:2]
    )
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_multipart_errors(s3, bucket):
    uid = s3.create_multipart_upload(Bucket=bucket, Key="bad")["UploadId"]
    small = s3.upload_part(Bucket=bucket, Key="bad", UploadId=uid, PartNumber=1, Body=b"tiny")["ETag"]
    last = s3.upload_part(Bucket=bucket, Key="bad", UploadId=uid, PartNumber=2, Body=b"end")["ETag"]

    def complete(parts):
        with pytest.raises(ClientError) as e:
            s3.complete_multipart_upload(Bucket=bucket, Key="bad", UploadId=uid, MultipartUpload={"Parts": parts})
        return error_of(e)

    assert complete([{"PartNumber": 1, "ETag": small}, {"PartNumber": 2, "ETag": last}]) == ("EntityTooSmall", 400)
    assert complete([{"PartNumber": 2, "ETag": last}, {"PartNumber": 1, "ETag": small}]) == ("InvalidPartOrder", 400)
    assert complete([{"PartNumber": 1, "ETag": '"0123"'}]) == ("InvalidPart", 400)
    assert complete([{"PartNumber": 7, "ETag": small}]) == ("InvalidPart", 400)
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=bucket, Key="bad", UploadId=uid, PartNumber=10001, Body=b"x")
    assert error_of(e) == ("InvalidArgument", 400)
    # A single small part is fine: only non-last parts have a minimum.
    s3.complete_multipart_upload(
        Bucket=bucket, Key="bad", UploadId=uid, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": small}]}
    )
    assert s3.get_object(Bucket=bucket, Key="bad")["Body"].read() == b"tiny"


def test_abort_multipart_and_no_such_upload(s3, bucket):
    uid = s3.create_multipart_upload(Bucket=bucket, Key="ab")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="ab", UploadId=uid, PartNumber=1, Body=b"x")
    r = s3.abort_multipart_upload(Bucket=bucket, Key="ab", UploadId=uid)
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 204
    for call in (
        lambda: s3.upload_part(Bucket=bucket, Key="ab", UploadId=uid, PartNumber=2, Body=b"x"),
        lambda: s3.list_parts(Bucket=bucket, Key="ab", UploadId=uid),
        lambda: s3.abort_multipart_upload(Bucket=bucket, Key="ab", UploadId=uid),
        lambda: s3.complete_multipart_upload(
            Bucket=bucket, Key="ab", UploadId=uid, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"x"'}]}
        ),
    ):
        with pytest.raises(ClientError) as e:
            call()
        assert error_of(e) == ("NoSuchUpload", 404)
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="ab")
    assert error_of(e) == ("404", 404)


def test_upload_file_uses_multipart_transfer(s3, bucket, tmp_path):
    path = tmp_path / "big.bin"
    data = os.urandom(12 * MIB)
    path.write_bytes(data)
    from boto3.s3.transfer import TransferConfig

    s3.upload_file(
        str(path), bucket, "big", Config=TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    )
    assert s3.head_object(Bucket=bucket, Key="big")["ETag"].endswith('-3"')
    out = tmp_path / "out.bin"
    s3.download_file(bucket, "big", str(out))
    assert out.read_bytes() == data


# Authentication (SigV4) ----------------------------------------------------------------------


def test_wrong_secret_is_signature_does_not_match(gateway):
    client = gateway.client(secret_key="wrong-secret")
    with pytest.raises(ClientError) as e:
        client.list_buckets()
    assert error_of(e) == ("SignatureDoesNotMatch", 403)


def test_unknown_access_key_is_invalid_access_key_id(gateway):
    client = gateway.client(access_key="CLNOSUCHKEY0000000", secret_key="x")
    with pytest.raises(ClientError) as e:
        client.list_buckets()
    assert error_of(e) == ("InvalidAccessKeyId", 403)


def test_anonymous_request_is_access_denied(gateway):
    r = httpx.get(gateway.endpoint + "/", verify=gateway.tls)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content


def test_skewed_clock_is_request_time_too_skewed(gateway, s3):
    original = gateway.app.clock
    gateway.app.clock = lambda: time.time() + 3600
    try:
        with pytest.raises(ClientError) as e:
            s3.list_buckets()
        assert error_of(e) == ("RequestTimeTooSkewed", 403)
    finally:
        gateway.app.clock = original


@pytest.mark.parametrize("signature_version", ["s3v4", None])  # None: boto3's default (SigV2 query) form
def test_presigned_get_and_put(gateway, bucket, signature_version):
    s3 = gateway.client(signature_version=signature_version) if signature_version else gateway.client()
    s3.put_object(Bucket=bucket, Key="shared", Body=b"presigned body")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "shared"}, ExpiresIn=60)
    r = httpx.get(url, verify=gateway.tls)
    assert r.status_code == 200 and r.content == b"presigned body"
    tampered = url.replace("shared", "sharee")
    assert httpx.get(tampered, verify=gateway.tls).status_code == 403
    put_url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "up"}, ExpiresIn=60)
    assert httpx.put(put_url, content=b"via url", verify=gateway.tls).status_code == 200
    assert s3.get_object(Bucket=bucket, Key="up")["Body"].read() == b"via url"


def test_expired_presigned_url_is_access_denied(gateway, bucket):
    s3 = gateway.client(signature_version="s3v4")
    s3.put_object(Bucket=bucket, Key="shared", Body=b"x")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "shared"}, ExpiresIn=1)
    original = gateway.app.clock
    gateway.app.clock = lambda: time.time() + 120
    try:
        r = httpx.get(url, verify=gateway.tls)
    finally:
        gateway.app.clock = original
    assert r.status_code == 403 and b"Request has expired" in r.content


def test_signed_payload_hash_mismatch_is_rejected(gateway, bucket):
    r = signed_request(
        gateway, "PUT", f"/{bucket}/k", body=b"actual", payload_hash=hashlib.sha256(b"claimed").hexdigest()
    )
    assert r.status_code == 400 and b"XAmzContentSHA256Mismatch" in r.content


def test_streaming_signed_chunks_are_verified(gateway, bucket):
    from cloudless.blobs.s3 import sigv4

    good = signed_request(gateway, "PUT", f"/{bucket}/streamed", body=b"x" * 70000, streaming=True)
    assert good.status_code == 200, good.content
    assert gateway.call(gateway.service.get_bytes, bucket, "streamed") == b"x" * 70000
    bad = signed_request(gateway, "PUT", f"/{bucket}/streamed2", body=b"y" * 100, streaming=True, corrupt_chunk=True)
    assert bad.status_code == 403 and b"SignatureDoesNotMatch" in bad.content
    assert sigv4.STREAMING_SIGNED  # mode under test


def signed_request(
    gateway,
    method,
    path,
    body=b"",
    payload_hash=None,
    streaming=False,
    corrupt_chunk=False,
    extra_headers=None,
    host=None,
):
    """A hand-signed SigV4 request (for what botocore refuses to send)."""
    from cloudless.blobs.s3 import sigv4

    host = host or gateway.endpoint.removeprefix("https://")
    now = time.time()
    amz_date = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"
    headers = {"host": host, "x-amz-date": amz_date, **(extra_headers or {})}
    raw_path, _, query_text = path.partition("?")
    query = [tuple(([*q.split("=", 1), ""])[:2]) for q in query_text.split("&") if q]
    if streaming:
        headers["x-amz-content-sha256"] = sigv4.STREAMING_SIGNED
        headers["content-encoding"] = "aws-chunked"
        headers["x-amz-decoded-content-length"] = str(len(body))
    else:
        headers["x-amz-content-sha256"] = payload_hash or hashlib.sha256(body).hexdigest()
    signed = sorted(headers)
    canonical = sigv4.canonical_request(method, raw_path, query, headers, signed, headers["x-amz-content-sha256"])
    key = sigv4.signing_key(gateway.key.secret_key, amz_date[:8], "us-east-1", "s3")
    signature = sigv4.sign(key, sigv4.string_to_sign(amz_date, scope, canonical))
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={gateway.key.access_key}/{scope}, SignedHeaders={';'.join(signed)}, "
        f"Signature={signature}"
    )
    if streaming:
        req = sigv4.SignedRequest(
            gateway.key.access_key, amz_date, scope, signature, key, sigv4.STREAMING_SIGNED, False
        )
        out, previous = b"", signature
        pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)] + [b""]
        for piece in pieces:
            sig = sigv4.chunk_signature(req, previous, hashlib.sha256(piece).hexdigest())
            if corrupt_chunk:
                sig = "0" * 64
            out += f"{len(piece):x};chunk-signature={sig}\r\n".encode() + piece + b"\r\n"
            previous = sig
        body = out
    if host == gateway.endpoint.removeprefix("https://"):
        del headers["host"]
    return httpx.request(method, gateway.endpoint + path, content=body, headers=headers, verify=gateway.tls)


# The AWS CLI ---------------------------------------------------------------------------------


def aws(gateway, *args, input=None):
    import shutil
    import subprocess

    exe = shutil.which("aws")
    if exe is None:
        pytest.skip("the AWS CLI is not installed")
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=gateway.key.access_key,
        AWS_SECRET_ACCESS_KEY=gateway.key.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
    )
    return subprocess.run(
        [exe, "--endpoint-url", gateway.endpoint, "--ca-bundle", str(gateway.ca_file), *args],
        capture_output=True,
        env=env,
        timeout=120,
        input=input,
    )


def test_aws_cli_cp_ls_sync_rm(gateway, bucket, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    (src / "sub").mkdir()
    (src / "sub" / "b.bin").write_bytes(os.urandom(9 * MIB))  # above the CLI's 8 MiB multipart threshold
    r = aws(gateway, "s3", "cp", "--recursive", str(src), f"s3://{bucket}/tree/")
    assert r.returncode == 0, r.stderr.decode()
    listing = aws(gateway, "s3", "ls", "--recursive", f"s3://{bucket}/tree/").stdout.decode()
    assert "tree/a.txt" in listing and "tree/sub/b.bin" in listing
    dst = tmp_path / "dst"
    r = aws(gateway, "s3", "sync", f"s3://{bucket}/tree/", str(dst))
    assert r.returncode == 0, r.stderr.decode()
    assert (dst / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    head = aws(gateway, "s3api", "head-object", "--bucket", bucket, "--key", "tree/sub/b.bin")
    assert head.returncode == 0 and b'-2\\"' in head.stdout  # multipart ETag
    assert aws(gateway, "s3", "rm", "--recursive", f"s3://{bucket}/tree/").returncode == 0
    assert aws(gateway, "s3", "ls", f"s3://{bucket}/tree/").stdout == b""


def test_aws_cli_reports_no_such_key(gateway, bucket):
    r = aws(gateway, "s3api", "get-object", "--bucket", bucket, "--key", "nope", "/dev/null")
    assert r.returncode != 0 and b"NoSuchKey" in r.stderr


def test_conditional_put_is_compare_and_set(s3, bucket):
    s3.put_object(Bucket=bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert error_of(e) == ("PreconditionFailed", 412)
    etag = s3.head_object(Bucket=bucket, Key="once")["ETag"]
    s3.put_object(Bucket=bucket, Key="once", Body=b"third", IfMatch=etag)
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="once", Body=b"fourth", IfMatch=etag)
    assert error_of(e) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=bucket, Key="once")["Body"].read() == b"third"


def test_malformed_delete_body_and_unsupported_subresources(gateway, s3, bucket):
    body = b"<Delete><Object><Key>a</Key></Object"  # truncated XML
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    r = signed_request(gateway, "POST", f"/{bucket}?delete", body=body, extra_headers={"content-md5": md5})
    assert r.status_code == 400 and b"<Code>MalformedXML</Code>" in r.content
    with pytest.raises(ClientError) as e:
        s3.get_bucket_versioning(Bucket=bucket)
    assert error_of(e) == ("NotImplemented", 501)


def test_list_parts_and_uploads_paginate(s3, bucket):
    uid = s3.create_multipart_upload(Bucket=bucket, Key="pp")["UploadId"]
    for n in range(1, 6):
        s3.upload_part(Bucket=bucket, Key="pp", UploadId=uid, PartNumber=n, Body=b"x")
    first = s3.list_parts(Bucket=bucket, Key="pp", UploadId=uid, MaxParts=2)
    assert [p["PartNumber"] for p in first["Parts"]] == [1, 2] and first["IsTruncated"]
    rest = s3.list_parts(Bucket=bucket, Key="pp", UploadId=uid, PartNumberMarker=first["NextPartNumberMarker"])
    assert [p["PartNumber"] for p in rest["Parts"]] == [3, 4, 5] and not rest["IsTruncated"]
    others = [s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"] for k in ("qa", "qb")]
    page = s3.list_multipart_uploads(Bucket=bucket, MaxUploads=2)
    assert [u["Key"] for u in page["Uploads"]] == ["pp", "qa"] and page["IsTruncated"]
    page2 = s3.list_multipart_uploads(
        Bucket=bucket, KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"]
    )
    assert [u["Key"] for u in page2["Uploads"]] == ["qb"]
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix="q")["Uploads"]] == ["qa", "qb"]
    for k, u in zip(("qa", "qb"), others, strict=True):
        s3.abort_multipart_upload(Bucket=bucket, Key=k, UploadId=u)


def test_virtual_hosted_style_requests(gateway, s3, bucket):
    gateway.app.domains = ("s3.cloudless.test",)
    try:
        port = gateway.endpoint.rsplit(":", 1)[1]
        host = f"{bucket}.s3.cloudless.test:{port}"
        r = signed_request(gateway, "PUT", "/dir/vh.txt", body=b"virtual", host=host)
        assert r.status_code == 200, r.content
        assert s3.get_object(Bucket=bucket, Key="dir/vh.txt")["Body"].read() == b"virtual"
        r = signed_request(gateway, "GET", "/dir/vh.txt", host=host)
        assert r.status_code == 200 and r.content == b"virtual"
    finally:
        gateway.app.domains = ()


def test_a_stalled_upload_times_out_and_stores_nothing(gateway, bucket):
    import socket

    from cloudless.blobs.s3 import sigv4

    original = gateway.app.body_idle_timeout
    gateway.app.body_idle_timeout = 0.5
    try:
        host = gateway.endpoint.removeprefix("https://")
        amz_date = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"
        headers = {
            "host": host,
            "x-amz-date": amz_date,
            "x-amz-content-sha256": sigv4.UNSIGNED_PAYLOAD,
            "content-length": "1000",
        }
        signed = sorted(headers)
        canonical = sigv4.canonical_request("PUT", f"/{bucket}/stalled", [], headers, signed, sigv4.UNSIGNED_PAYLOAD)
        key = sigv4.signing_key(gateway.key.secret_key, amz_date[:8], "us-east-1", "s3")
        signature = sigv4.sign(key, sigv4.string_to_sign(amz_date, scope, canonical))
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={gateway.key.access_key}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={signature}"
        )
        ip, port = host.rsplit(":", 1)
        with socket.create_connection((ip, int(port)), timeout=10) as raw:
            with gateway.tls.wrap_socket(raw, server_hostname=ip) as tls:
                head = f"PUT /{bucket}/stalled HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                tls.sendall(head.encode() + b"\r\n" + b"x" * 100)  # 100 of the 1000 bytes, then silence
                reply = b""
                while b"</Error>" not in reply:
                    piece = tls.recv(65536)
                    if not piece:
                        break
                    reply += piece
        assert b" 400 " in reply.split(b"\r\n")[0] and b"<Code>RequestTimeout</Code>" in reply
    finally:
        gateway.app.body_idle_timeout = original
    assert gateway.call(gateway.service.metadata.list_manifests, bucket).objects == []
