"""`cloudless blob` and `cloudless s3` as a user runs them (real processes, a real data dir)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import boto3
import pytest
from botocore.config import Config


def run(cloudless_bin, *args, data_dir, check=True, input=None):
    proc = subprocess.run(
        [cloudless_bin, *args, "--data-dir", str(data_dir)], capture_output=True, input=input, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_put_ls_get_rm_with_json_and_exit_codes(cloudless_bin, tmp_path):
    data_dir = tmp_path / "node"
    src = tmp_path / "file.bin"
    src.write_bytes(os.urandom(3_000_000))
    doc = json.loads(
        run(
            cloudless_bin,
            "blob",
            "put",
            str(src),
            "bkt/dir/file.bin",
            "--meta",
            "Owner=me",
            "--json",
            data_dir=data_dir,
        ).stdout
    )
    assert doc["object"]["size"] == 3_000_000 and doc["object"]["metadata"] == {"owner": "me"}
    listing = json.loads(run(cloudless_bin, "blob", "ls", "bkt", "--json", data_dir=data_dir).stdout)
    assert listing["prefixes"] == ["dir/"] and listing["items"] == []
    listing = json.loads(run(cloudless_bin, "blob", "ls", "bkt/dir/", "--json", data_dir=data_dir).stdout)
    assert [o["key"] for o in listing["items"]] == ["dir/file.bin"]
    buckets = json.loads(run(cloudless_bin, "blob", "ls", "--json", data_dir=data_dir).stdout)
    assert [b["name"] for b in buckets["items"]] == ["bkt"]
    out = tmp_path / "copy.bin"
    run(cloudless_bin, "blob", "get", "bkt/dir/file.bin", str(out), data_dir=data_dir)
    assert out.read_bytes() == src.read_bytes()
    piped = run(cloudless_bin, "blob", "get", "bkt/dir/file.bin", "-", data_dir=data_dir)
    assert piped.stdout == src.read_bytes()
    run(cloudless_bin, "blob", "rm", "bkt/dir/file.bin", data_dir=data_dir)
    missing = run(cloudless_bin, "blob", "get", "bkt/dir/file.bin", str(out), "--json", data_dir=data_dir, check=False)
    assert missing.returncode == 3 and json.loads(missing.stdout)["error"] == "no_such_key"
    assert run(cloudless_bin, "blob", "rm", "bkt/dir/file.bin", data_dir=data_dir, check=False).returncode == 3
    bad = run(cloudless_bin, "blob", "put", str(src), "nokey", "--json", data_dir=data_dir, check=False)
    assert bad.returncode == 2


def test_put_from_stdin(cloudless_bin, tmp_path):
    run(cloudless_bin, "blob", "put", "-", "bkt/stdin", data_dir=tmp_path, input=b"from a pipe")
    assert run(cloudless_bin, "blob", "get", "bkt/stdin", "-", data_dir=tmp_path).stdout == b"from a pipe"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keys_create_then_boto3_against_s3_serve(cloudless_bin, tmp_path):
    """The 'new user' path: create keys, serve the gateway, point boto3 at the endpoint."""
    data_dir = tmp_path / "node"
    port = _free_port()
    keys = json.loads(
        run(
            cloudless_bin,
            "s3",
            "keys",
            "create",
            "--json",
            "--endpoint",
            f"https://127.0.0.1:{port}",
            data_dir=data_dir,
        ).stdout
    )
    assert set(keys) == {"endpoint", "access_key", "secret_key"}
    server = subprocess.Popen(
        [cloudless_bin, "s3", "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ca = data_dir / "blobs" / "gateway" / "ca.pem"
        client = boto3.client(
            "s3",
            endpoint_url=keys["endpoint"],
            aws_access_key_id=keys["access_key"],
            aws_secret_access_key=keys["secret_key"],
            region_name="us-east-1",
            verify=str(ca),
            config=Config(retries={"max_attempts": 1}),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="from-boto")
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        client.put_object(Bucket="from-boto", Key="hello.txt", Body=b"hello")
        assert client.get_object(Bucket="from-boto", Key="hello.txt")["Body"].read() == b"hello"
    finally:
        server.terminate()
        server.wait(10)
    listing = json.loads(run(cloudless_bin, "blob", "ls", "from-boto", "--json", data_dir=data_dir).stdout)
    assert [o["key"] for o in listing["items"]] == ["hello.txt"]


@pytest.mark.parametrize("args", [["blob", "get", "nobucket/x", "-"], ["blob", "ls", "nobucket"]])
def test_missing_bucket_exits_3(cloudless_bin, tmp_path, args):
    assert run(cloudless_bin, *args, data_dir=tmp_path, check=False).returncode == 3
