"""`cloudless ca rotate` on a running cluster (real node processes, the memory
runtime): both CAs trusted, every node and the admin client re-issued from
the new one, the old one retired and its certificates refused — while a
workload keeps running and `vars` writes succeed at every step (issue 13,
"CA key custody and rotation")."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from cloudless.pki.bundle import authority_key_id, load_bundle, subject_key_id
from cloudless.pki.ca import certificate_fingerprint
from tests.harness.node_cluster import NodeProcess, bootstrap, cli, cli_json, free_port, status, token, wait_for


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDLESS_RUNTIME", "memory")  # inherited by the node processes
    nodes = [NodeProcess(tmp_path / f"node{i}", free_port(), f"node{i}") for i in (1, 2, 3)]
    device = NodeProcess(tmp_path / "phone", free_port(), "phone")  # outside Raft: learns the CA from the leader
    try:
        config = bootstrap(nodes[0])
        coordinator_token = token(config, "--uses", "2", "--trust", "coordinator")
        for node in nodes[1:]:
            node.start("--join", nodes[0].address, "--token", coordinator_token)
        device.start("--join", nodes[0].address, "--token", token(config))
        wait_for(lambda: len(status(config)["voters"]) == 3, 90, "three voters")
        wait_for(lambda: sum(m["state"] == "alive" for m in status(config)["members"]) == 4, 60, "four live members")
        yield config, [*nodes, device], tmp_path
    finally:
        for node in [device, *reversed(nodes)]:
            node.stop()


def _context(config: Path) -> dict:
    doc = yaml.safe_load(config.read_text())
    return next(c for c in doc["contexts"] if c["name"] == doc["current-context"])


def _issuer_key(cert_pem: bytes) -> bytes | None:
    return authority_key_id(x509.load_pem_x509_certificate(cert_pem))


def _running(config: Path) -> dict[str, str]:
    doc = cli_json("inspect", "web", config=config)
    return {a["id"]: a["node"] for a in doc["allocations"] if a["desired"] == "run" and a["state"] == "running"}


def test_rotation_reissues_every_node_and_client_then_retires_the_old_ca(cluster) -> None:
    config, nodes, tmp = cluster
    old_ca = load_bundle(_context(config)["ca"].encode())
    assert len(old_ca) == 1
    old_key = subject_key_id(old_ca[0])
    old_admin = tmp / "old-admin.yaml"
    old_admin.write_text(config.read_text())
    old_admin.chmod(0o600)

    cli("run", "busybox:latest", "--name", "web", "--replicas", "2", "--", "sleep", "3600", config=config, check=True)
    replicas = wait_for(lambda: (r := _running(config)) and len(r) == 2 and r, 60, "two running replicas")

    writes = itertools.count()

    def write() -> None:
        n = next(writes)
        assert cli_json("vars", "put", "during-rotation", str(n), config=config)["value"] == str(n)

    write()
    started = cli_json("ca", "rotate", "--overlap", "8s", config=config)
    assert started["phase"] == "trust" and started["active_fingerprint"] == certificate_fingerprint(old_ca[0])
    assert cli("ca", "rotate", config=config).returncode == 4  # one rotation at a time
    new_fingerprint = started["other_fingerprint"]
    assert new_fingerprint and new_fingerprint != started["active_fingerprint"]

    phases = []

    def rotated() -> bool:
        write()  # every step of the way
        doc = cli_json("ca", "status", config=config)
        phases.append(doc["phase"])
        return doc["phase"] == "stable"

    wait_for(rotated, 120, "the rotation to finish", interval=0.5)
    write()
    assert "trust" in phases or "reissue" in phases
    final = cli_json("ca", "status", config=config)
    assert final["active_fingerprint"] == new_fingerprint and final["other_fingerprint"] == ""

    # Every node holds a certificate from the new CA (retirement waited for that), and trusts only
    # the new CA: Raft members at once, the device outside Raft at its next sync with the leader.
    new_key = subject_key_id(load_bundle(_context(config)["ca"].encode())[0])
    for node in nodes:
        assert _issuer_key((node.data_dir / "tls" / "cert.pem").read_bytes()) == new_key, node.name
        wait_for(
            lambda node=node: (
                [certificate_fingerprint(c) for c in load_bundle((node.data_dir / "tls" / "ca.pem").read_bytes())]
                == [new_fingerprint]
            ),
            30,
            f"{node.name} to drop the old CA",
        )
    # So does the admin client config the CLI kept current.
    context = _context(config)
    assert [certificate_fingerprint(c) for c in load_bundle(context["ca"].encode())] == [new_fingerprint]
    assert _issuer_key(context["certificate"].encode()) == new_key != old_key
    assert (config.stat().st_mode & 0o777) == 0o600

    # A certificate from the old CA is refused: by a client that trusts only the old CA (no node
    # presents one any more), and by every node, even to a client that trusts both CAs.
    with_old_trust = cli("status", "--json", config=old_admin)
    assert with_old_trust.returncode == 1, with_old_trust.stdout
    assert json.loads(with_old_trust.stdout)["context"]["reason"] == "unknown_ca"
    stale = yaml.safe_load(old_admin.read_text())
    for c in stale["contexts"]:
        c["ca"] = context["ca"] + c["ca"]  # trusts both; presents the old certificate
    old_cert_both_trusted = tmp / "old-cert-both-trusted.yaml"
    old_cert_both_trusted.write_text(yaml.safe_dump(stale))
    for node in nodes[:3]:
        refused = cli("vars", "put", "from-old-cert", "x", "--endpoint", node.address, config=old_cert_both_trusted)
        assert refused.returncode != 0, refused.stdout
        assert "refused our certificate" in refused.stderr, refused.stderr
    assert cli("vars", "get", "from-old-cert", config=config).returncode == 3

    # `ca renew` re-issues on demand: a new serial and key, the same identity and role.
    before = _context(config)
    renewed = cli_json("ca", "renew", config=config)
    after = _context(config)
    assert renewed["cas"] == 1 and after["key"] != before["key"] and after["certificate"] != before["certificate"]
    assert format(x509.load_pem_x509_certificate(after["certificate"].encode()).serial_number, "x") == renewed["serial"]
    assert cli_json("token", "create", config=config)["token"]  # still an admin

    # The workload never noticed: the same replicas still run, and vars kept working.
    assert _running(config) == replicas
    assert cli_json("vars", "get", "during-rotation", config=config)["value"] == str(next(writes) - 1)
    assert len(status(config)["voters"]) == 3
