"""Blob storage in a real 3-node cluster: S3 keys issued through the cluster CLI,
boto3 against the nodes' gateways (TLS from the cluster CA), and a `kill -9` of
a chunk holder losing no object while anti-entropy restores R=2 on the survivors."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from cloudless.api import client_config
from tests.harness.node_cluster import NodeProcess, bootstrap, cli, cli_json, free_port, join, status, wait_for

R = 2
# What the test's own waits poll through: a gateway still starting fails boto3
# calls with anything (connection, TLS, S3 errors).
ANY_FAILURE = (Exception,)


class BlobNodeProcess(NodeProcess):
    """A node that also serves the S3 gateway, on a port of its own."""

    def __init__(self, root: Path, name: str) -> None:
        port = free_port()
        self.s3 = f"127.0.0.1:{free_port()}"
        super().__init__(root / name, port, name, "--s3-listen", self.s3)

    def held_chunks(self) -> set[str]:
        """Digests of the chunk files in this node's store (fan-out directories)."""
        root = self.data_dir / "blobs" / "store" / "chunks"
        return {p.name for p in root.glob("*/*/*") if p.is_file()}


@pytest.fixture
def cluster(tmp_path):
    nodes = [BlobNodeProcess(tmp_path, f"node{i}") for i in (1, 2, 3)]
    first = nodes[0]
    try:
        config = bootstrap(first)
        join(config, first, *nodes[1:])
        wait_for(lambda: status(config)["voters"] == ["node1", "node2", "node3"], 60, "three voters")
        yield nodes, config
    except BaseException:
        for node in nodes:
            print(f"--- {node.name} ---\n{node.output(3000)}")
        raise
    finally:
        for node in nodes:
            node.stop()


def s3_client(endpoint: str, keys: dict, ca_file: Path):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=keys["access_key"],
        aws_secret_access_key=keys["secret_key"],
        region_name="us-east-1",
        verify=str(ca_file),
        config=Config(retries={"max_attempts": 2}, s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=30),
    )


def test_s3_through_the_cluster_survives_kill9_of_a_chunk_holder(cluster, tmp_path):
    nodes, config = cluster
    ca_file = tmp_path / "cluster-ca.pem"
    ca_file.write_bytes(client_config.load(config).context(None).ca_pem)

    keys = cli_json("s3", "keys", "create", "--description", "test", config=config)
    assert set(keys) == {"endpoint", "access_key", "secret_key"}
    assert keys["endpoint"] == f"https://{nodes[0].s3}"  # the node the client config reaches serves S3

    s3 = s3_client(keys["endpoint"], keys, ca_file)
    wait_for(lambda: s3.list_buckets() is not None, 30, "node1's gateway", tolerate=ANY_FAILURE)
    s3.create_bucket(Bucket="photos")
    rng = __import__("random").Random(7)
    bodies = {
        "a/one.txt": b"hello cloudless\n",
        "a/two.bin": rng.randbytes(3 << 20),
        "b/three.bin": rng.randbytes(700_000),
    }
    for key, body in bodies.items():
        s3.put_object(Bucket="photos", Key=key, Body=body, Metadata={"origin": "test"})
    listed = s3.list_objects_v2(Bucket="photos", Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/one.txt", "a/two.bin"]
    top = s3.list_objects_v2(Bucket="photos", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["a/", "b/"]
    got = s3.get_object(Bucket="photos", Key="a/two.bin")
    assert got["Body"].read() == bodies["a/two.bin"] and got["Metadata"] == {"origin": "test"}

    s3.put_object(Bucket="photos", Key="gone.txt", Body=b"bye")
    s3.delete_object(Bucket="photos", Key="gone.txt")
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket="photos", Key="gone.txt")

    parts = [rng.randbytes(5 << 20), rng.randbytes(1 << 20)]
    upload = s3.create_multipart_upload(Bucket="photos", Key="big/multi.bin")
    etags = [
        s3.upload_part(Bucket="photos", Key="big/multi.bin", UploadId=upload["UploadId"], PartNumber=i + 1, Body=p)[
            "ETag"
        ]
        for i, p in enumerate(parts)
    ]
    done = s3.complete_multipart_upload(
        Bucket="photos",
        Key="big/multi.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]},
    )
    assert done["ETag"].strip('"').endswith("-2")
    bodies["big/multi.bin"] = b"".join(parts)

    # `cloudless blob` with the client config acts on the same cluster: put (a multipart
    # upload past 8 MiB), ls, get, rm.
    big = tmp_path / "big.bin"
    big.write_bytes(rng.randbytes(9 << 20))
    put = cli_json("blob", "put", str(big), "photos/cli/big.bin", config=config, timeout=60)
    assert put["object"]["size"] == 9 << 20 and put["object"]["etag"].endswith("-2")
    bodies["cli/big.bin"] = big.read_bytes()
    assert cli_json("blob", "get", "photos/a/one.txt", str(tmp_path / "one.txt"), config=config)["object"]["size"] == 16
    assert (tmp_path / "one.txt").read_bytes() == bodies["a/one.txt"]
    cli_json("blob", "get", "photos/cli/big.bin", str(tmp_path / "big.out"), config=config, timeout=60)
    assert (tmp_path / "big.out").read_bytes() == bodies["cli/big.bin"]
    listing = cli_json("blob", "ls", "photos/", config=config)
    assert listing["prefixes"] == ["a/", "b/", "big/", "cli/"]
    assert [b["name"] for b in cli_json("blob", "ls", config=config)["items"]] == ["photos"]
    cli_json("blob", "put", str(tmp_path / "one.txt"), "photos/tmp.txt", config=config)
    assert cli_json("blob", "rm", "photos/tmp.txt", config=config) == {
        "deleted": {"bucket": "photos", "key": "tmp.txt"}
    }
    missing = cli("blob", "rm", "photos/tmp.txt", "--json", config=config)
    assert missing.returncode == 3, missing.stdout + missing.stderr
    assert [k["access_key"] for k in cli_json("s3", "keys", "ls", config=config)["items"]] == [keys["access_key"]]

    # Another node's gateway sees the same objects (manifests are in Raft).
    other = s3_client(f"https://{nodes[1].s3}", keys, ca_file)
    assert other.get_object(Bucket="photos", Key="b/three.bin")["Body"].read() == bodies["b/three.bin"]

    # Every chunk of every object is on R nodes (the deleted object's chunk waits for GC).
    by_node = {n.name: n.held_chunks() for n in nodes}
    referenced = set().union(*by_node.values()) - {hashlib.sha256(b"bye").hexdigest()}
    assert len(referenced) >= len(bodies)
    for digest in referenced:
        assert sum(digest in held for held in by_node.values()) >= R, digest

    # kill -9 a chunk holder that does not lead (the leader runs anti-entropy).
    leader = status(config)["leader"]
    victim = max((n for n in nodes if n.name != leader), key=lambda n: len(by_node[n.name]))
    assert by_node[victim.name]
    victim.kill9()
    killed_at = time.monotonic()
    survivors = [n for n in nodes if n is not victim]

    reader = s3_client(f"https://{survivors[0].s3}", keys, ca_file)
    for key, body in bodies.items():
        data = reader.get_object(Bucket="photos", Key=key)["Body"].read()
        assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest(), key

    def restored() -> bool:
        held = [n.held_chunks() for n in survivors]
        return all(all(d in h for h in held) for d in referenced)

    wait_for(restored, 45, f"anti-entropy to restore R={R} on the survivors", interval=0.5, tolerate=ANY_FAILURE)
    print(
        f"R={R} restored {time.monotonic() - killed_at:.1f}s after kill -9 of {victim.name} ({len(referenced)} chunks)"
    )
    for key, body in bodies.items():
        assert (
            survivors[1]
            and s3_client(f"https://{survivors[1].s3}", keys, ca_file)
            .get_object(Bucket="photos", Key=key)["Body"]
            .read()
            == body
        )
