"""The workload YAML on a real local cluster (two `cloudless node` processes,
the memory runtime — placement and the spec are what is tested, not runc):
`apply --dry-run` shows the placement the leader's scheduler would make and
changes nothing; `inspect -o yaml|json | apply -f -` is a no-op; a node
certificate may not ask for a dry run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from tests.harness.node_cluster import CLI, NodeProcess, bootstrap, cli, cli_json, free_port, join, status, wait_for

SPEC = """\
name: web
image: busybox:latest
command: [sh, -c, "while true; do sleep 1; done"]
replicas: 3
resources: {cpu: 100m, memory: 32Mi}
restart: {mode: on-failure, max_retries: 3, backoff_initial: 250ms, backoff_max: 1m}
update: {max_surge: 1, min_healthy_time: 0s, healthy_deadline: 2m30s}
spreads:
  - {attribute: node, max_per: 1}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    mp = pytest.MonkeyPatch()
    mp.setenv("CLOUDLESS_RUNTIME", "memory")  # inherited by the node processes
    nodes = [NodeProcess(tmp / f"node{i}", free_port(), f"node{i}") for i in (1, 2)]
    try:
        config = bootstrap(nodes[0])
        join(config, nodes[0], nodes[1])
        wait_for(lambda: sum(m["state"] == "alive" for m in status(config)["members"]) == 2, 60, "two live members")
        yield config, nodes, tmp
    finally:
        for node in nodes:
            node.stop()
        mp.undo()


def apply_stdin(config: Path, text: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLOUDLESS_CONFIG": str(config)}
    return subprocess.run(
        [*CLI, "apply", "-f", "-", *args], input=text, capture_output=True, text=True, timeout=30, env=env
    )


def test_dry_run_shows_the_placement_and_changes_nothing(cluster):
    config, _, tmp = cluster
    path = tmp / "web.yaml"
    path.write_text(SPEC)
    doc = cli_json("apply", "-f", str(path), "--dry-run", config=config)
    assert (doc["name"], doc["action"], doc["version"], doc["refused"]) == ("web", "create", 1, "")
    assert sorted(p["node"] for p in doc["placements"]) == ["node1", "node2"]  # one per node: max_per 1
    assert [f["replica"] for f in doc["failures"]] == [2]
    assert doc["failures"][0]["reasons"] == {"spread limit 1 per node": 2}
    human = cli("apply", "-f", str(path), "--dry-run", config=config, check=True).stdout
    assert "would create version 1" in human and "replica 2 not placed" in human, human
    assert "dry run, nothing changed" in human
    assert cli_json("ps", config=config)["items"] == []  # nothing was submitted

    run = cli(
        "run", "busybox:latest", "--name", "far", "--constraint", "zone=mars", "--dry-run", "--json", config=config
    )
    assert run.returncode == 1, run.stdout + run.stderr  # `run` itself would be refused
    refused = json.loads(run.stdout)
    assert refused["refused"] == "no node satisfies constraint node.zone=mars"
    assert refused["node_reasons"] == {"node1": "constraint node.zone=mars", "node2": "constraint node.zone=mars"}
    assert cli_json("ps", config=config)["items"] == []


def test_inspect_output_applied_again_changes_nothing(cluster):
    config, _, tmp = cluster
    path = tmp / "rt.yaml"
    path.write_text(SPEC.replace("name: web", "name: rt").replace("replicas: 3", "replicas: 2"))
    first = cli_json("apply", "-f", str(path), config=config)
    assert first["version"] == 1
    wait_for(
        lambda: sum(a["state"] == "running" for a in cli_json("inspect", "rt", config=config)["allocations"]) == 2,
        60,
        "two running replicas",
    )
    before = cli_json("inspect", "rt", config=config)
    for fmt in ("yaml", "json"):
        text = cli("inspect", "rt", "-o", fmt, config=config, check=True).stdout
        assert "healthy_deadline_s: 150" in text or '"healthy_deadline_s": 150' in text, text
        preview = apply_stdin(config, text, "--dry-run", "--json")
        assert preview.returncode == 0, preview.stderr
        dry = json.loads(preview.stdout)
        assert (dry["action"], dry["version"], dry["placements"]) == ("unchanged", 1, [])
        assert sorted(k["node"] for k in dry["kept"]) == ["node1", "node2"]
        again = apply_stdin(config, text, "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["version"] == 1  # no new version
    after = cli_json("inspect", "rt", config=config)
    assert after["spec"] == before["spec"]
    assert {a["id"] for a in after["allocations"]} == {a["id"] for a in before["allocations"]}
    # A real change is a new version.
    changed = apply_stdin(config, text.replace("replicas: 2", "replicas: 1").replace('"replicas": 2', '"replicas": 1'))
    assert changed.returncode == 0, changed.stderr
    assert cli_json("inspect", "rt", config=config)["spec"]["version"] == 2
    cli("stop", "rt", config=config, check=True)


def test_a_node_certificate_may_not_dry_run(cluster):
    from cloudless.api import client_config
    from cloudless.api.client import ClusterClient
    from cloudless.api.client_config import Context
    from cloudless.api.workloads import DryRun
    from cloudless.coordinator.preview import Preview
    from cloudless.errors import CloudlessError
    from cloudless.pki.credentials import Credentials
    from cloudless.state.workload import parse_yaml

    config, nodes, _ = cluster
    node2 = nodes[1]
    creds = Credentials.load(node2.data_dir / "tls")
    context = Context(
        name="as-node2",
        cluster_id=creds.identity.cluster_id,
        endpoints=[nodes[0].address, node2.address],
        ca_pem=creds.ca_pem,
        certificate_pem=creds.cert_pem,
        key_pem=creds.key_pem,
    )
    spec = parse_yaml(SPEC)

    async def ask(as_context: Context, endpoint: str) -> Preview:
        client = ClusterClient(as_context, endpoint=endpoint)
        try:
            return await client.call("workloads.dry_run", DryRun(spec, True), response=Preview)
        finally:
            await client.aclose()

    for endpoint in (nodes[0].address, node2.address):  # the leader, and a node that would forward
        with pytest.raises(CloudlessError) as info:
            trio.run(ask, context, endpoint)
        assert info.value.code == "permission_denied", info.value
        assert "may not preview workload placements" in info.value.message, info.value.message
        # The same call with the admin's certificate is served, through either node.
        admin = client_config.load(config).context()
        assert trio.run(ask, admin, endpoint).name == "web"
