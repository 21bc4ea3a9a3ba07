"""Images go to the cluster, and nodes say what they can run (issue 17), on a
real 2-node cluster: node1 runs containers (root + runc), node2 is started with
`--runtime none`.

- `image import` with the client config publishes the image to the blob
  store; `image ls` with the config lists it; no node had it locally, yet a
  workload of it reaches running on node1 (fetched from peers).
- The scheduler never places a replica on node2, and a workload that could
  only go there stays pending with the reason visible in `inspect` and `ps`.
- `image pull` with the config pulls on a node from a local registry into
  the cluster.
- A node certificate is refused by the image calls (client/admin only).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import trio

from tests.harness.node_cluster import NodeProcess, bootstrap, cli, cli_json, free_port, join, wait_for

pytestmark = [pytest.mark.root, pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")]


def build_busybox(dest: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import sys; from pathlib import Path; from cloudless.sandbox.imagebuild import build_busybox_image;"
                " build_busybox_image(Path(sys.argv[1]), 'layout')"
            ),
            str(dest),
        ],
        check=True,
        timeout=60,
    )
    return dest / "layout"


def running(doc: dict) -> list[dict]:
    return [a for a in doc["allocations"] if a["desired"] == "run" and a["state"] == "running"]


def node_call(node: NodeProcess, method: str, body: object) -> Exception | None:
    """Call `method` on node1 with node2's *node* certificate; the error it got."""
    from cloudless.api.client import ClusterClient
    from cloudless.api.client_config import Context

    tls = node.data_dir / "tls" / "current"
    record = json.loads((node.data_dir / "node.json").read_text())
    context = Context(
        name="as-node",
        cluster_id=record["cluster_id"],
        endpoints=[node.address],
        ca_pem=(tls / "ca.pem").read_bytes(),
        certificate_pem=(tls / "cert.pem").read_bytes(),
        key_pem=(tls / "key.pem").read_bytes(),
    )

    async def main() -> Exception | None:
        client = ClusterClient(context)
        try:
            await client.call(method, body, timeout=20)
        except Exception as exc:
            return exc
        finally:
            await client.aclose()
        return None

    return trio.run(main)


@pytest.fixture
def cluster(tmp_path):
    node1 = NodeProcess(tmp_path / "node1", free_port(), "node1")
    node2 = NodeProcess(tmp_path / "node2", free_port(), "node2", "--runtime", "none")
    nodes = [node1, node2]
    config = None
    try:
        config = bootstrap(node1)
        join(config, node1, node2)

        def both_report_runtime() -> bool:
            members = {m["id"]: m for m in cli_json("nodes", "ls", config=config)["items"]}
            return (
                members.get("node1", {}).get("runtime") == "runc" and members.get("node2", {}).get("runtime") == "none"
            )

        wait_for(both_report_runtime, 60, "both nodes alive with their runtimes")
        yield config, node1, node2
    finally:
        if config is not None:
            for name in ("bb", "only-node2"):
                cli("stop", name, config=config)
            containers = node1.data_dir / "agent" / "sandbox" / "containers"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and containers.exists() and any(containers.iterdir()):
                time.sleep(0.3)
        for node in reversed(nodes):
            node.stop()


def test_import_from_the_client_runs_on_a_node_that_never_had_it_and_runtime_none_gets_nothing(cluster, tmp_path):
    config, node1, node2 = cluster
    layout = build_busybox(tmp_path / "image")

    imported = cli_json("image", "import", str(layout), "--name", "busybox:latest", config=config, timeout=120)
    assert len(imported["items"]) == 1, imported
    [image] = imported["items"]
    assert image["name"] == "docker.io/library/busybox:latest" and image["publisher"] == "client"
    listed = cli_json("image", "ls", config=config)["items"]
    assert [(i["name"], i["id"]) for i in listed] == [(image["name"], image["id"])]
    human = cli("image", "ls", config=config, check=True).stdout
    assert "docker.io/library/busybox" in human and image["id"][7:19] in human
    for node in (node1, node2):  # the client published it; no node's local store has it
        local = cli_json("image", "ls", "--data-dir", str(node.data_dir), config=config)
        assert local["items"] == []

    cli("run", "busybox:latest", "--name", "bb", "--memory", "32Mi", "--", "sleep", "3600", config=config, check=True)
    doc = wait_for(
        lambda: (d := cli_json("inspect", "bb", config=config)) and len(running(d)) == 1 and d,
        90,
        "bb running",
    )
    assert [a["node"] for a in doc["allocations"]] == ["node1"]  # never node2
    assert doc["pending_reason"] == ""
    assert "image.fetched_from_peers" in node1.output(200_000)

    cli(
        "run",
        "busybox:latest",
        "--name",
        "only-node2",
        "--constraint",
        "id=node2",
        "--",
        "true",
        config=config,
        check=True,
    )
    doc = wait_for(
        lambda: (d := cli_json("inspect", "only-node2", config=config))["pending_reason"] and d,
        60,
        "a pending reason for only-node2",
    )
    assert doc["state"] == "pending" and doc["allocations"] == []
    assert "cannot run containers: node2 runtime=none" in doc["pending_reason"], doc["pending_reason"]
    ps = {i["name"]: i for i in cli_json("ps", config=config)["items"]}
    assert "node2 runtime=none" in ps["only-node2"]["pending_reason"]
    assert "node2 runtime=none" in cli("ps", config=config, check=True).stdout
    assert (
        "pending: cannot run containers: node2 runtime=none"
        in cli("inspect", "only-node2", config=config, check=True).stdout
    )
    nodes_table = cli("nodes", config=config, check=True).stdout
    assert "RUNTIME" in nodes_table and "none" in nodes_table


def test_node_certificates_are_refused_by_the_image_calls(cluster):
    from cloudless.api.images import ImagePullRequest

    _, _, node2 = cluster
    for method, body in (("images.list", b""), ("images.pull", ImagePullRequest("busybox:latest"))):
        error = node_call(node2, method, msgspec.msgpack.encode(body) if not isinstance(body, bytes) else body)
        assert error is not None and getattr(error, "code", "") == "permission_denied", (method, error)


def test_pull_with_a_config_runs_on_a_node_and_lands_in_the_cluster(cluster, tmp_path):
    from cloudless.sandbox.imagebuild import busybox_image
    from tests.harness.registry import DOCKER_REGISTRY, LocalRegistry, push_image

    if not DOCKER_REGISTRY.exists():
        pytest.skip("Debian docker-registry is not installed")
    config, _, _ = cluster
    registry = LocalRegistry(tmp_path / "registry").start()
    try:
        push_image(busybox_image(), registry.url, "team/busybox", "1.0")
        ref = f"{registry.host}/team/busybox:1.0"
        reply = cli_json("image", "pull", ref, "--insecure-registry", registry.host, config=config, timeout=120)
        assert reply["image"]["name"] == ref and reply["node"] in ("node1", "node2")
        assert reply["image"]["publisher"] == reply["node"]
        names = [i["name"] for i in cli_json("image", "ls", config=config)["items"]]
        assert ref in names
        bad = cli("image", "pull", "not a reference", "--json", config=config)
        assert bad.returncode == 2 and json.loads(bad.stdout)["error"]
    finally:
        registry.stop()
