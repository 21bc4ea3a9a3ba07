"""boto3 against the S3 gateway served by hypercorn over TLS (cluster-CA certificate).

Each test names the S3 behaviour it pins (Amazon S3 API Reference, the
operation's page); error cases check the exact code and HTTP status.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import boto3
import httpx
import pytest
import trio
from botocore.config import Config
from botocore.exceptions import ClientError

from cloudless.blobs.chunkstore import LocalChunkStore
from cloudless.blobs.manifest import LocalMetadataStore
from cloudless.blobs.objects import ObjectService
from cloudless.blobs.s3.app import S3Gateway
from cloudless.blobs.s3.server import issue_gateway_certificate, serve_gateway
from cloudless.pki.ca import ClusterCA

MIB = 1024 * 1024


class Gateway:
    def __init__(self, tmp) -> None:
        now = datetime.now(timezone.utc)
        ca = ClusterCA.create("s3test", now)
        cert, key = issue_gateway_certificate(ca, ["127.0.0.1", "localhost"], now)
        self.ca_file = tmp / "ca.pem"
        self.ca_file.write_bytes(ca.certificate_pem)
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
                    self.app, host="127.0.0.1", port=0, certfile=tmp / "gw.pem", keyfile=tmp / "gw.key",
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
    put = s3.put_object(Bucket=bucket, Key="dir/obj.bin", Body=body, ContentType="application/x-test",
                        Metadata={"Color": "blue"})
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    got = s3.get_object(Bucket=bucket, Key="dir/obj.bin")
    assert got["Body"].read() == body
    assert got["ContentType"] == "application/x-test"
    assert got["Metadata"] == {"color": "blue"}
    assert got["ContentLength"] == len(body)
    head = s3.head_object(Bucket=bucket, Key="dir/obj.bin")
    assert head["ETag"] == put["ETag"] and head["ContentLength"] == len(body)
