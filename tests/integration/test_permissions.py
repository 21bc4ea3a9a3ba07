"""The permission matrix against real node processes: every RPC method x
every kind of caller, on TLS and on QUIC, must be allowed or refused exactly
as cloudless/authz/table.py says; forwarded calls are authorized by the
client's own proof, which a node can neither forge nor replay."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
import trio

from cloudless.api import client_config
from cloudless.api.messages import TokenCreate, TokenReply
from cloudless.authz import PERMISSIONS, ProofSigner, principal_of
from cloudless.authz.table import ENROLL
from cloudless.errors import CloudlessError
from cloudless.node.enroll import enroll
from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import Credentials, issue_credentials
from cloudless.pki.errors import PeerRejected
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import ConnectionLost, PeerIdentity
from cloudless.transport.quic import QuicCarrier
from cloudless.transport.rpc import RpcClient
from cloudless.transport.tls import TlsCarrier, connect_enrollment
from tests.harness.node_cluster import CLI, NodeProcess, bootstrap, cli, free_port, join, status, wait_for

CALL_TIMEOUT = 2.0


@dataclass
class Cluster:
    config: Path
    leader: NodeProcess
    follower: NodeProcess
    admin: Credentials
    cluster_id: str
    identities: dict[str, Credentials]


def _address(node: NodeProcess) -> tuple[str, int]:
    host, port = node.address.rsplit(":", 1)
    return host, int(port)


async def _token(cluster_config: Path, admin: Credentials, cluster_id: str, address, role: str) -> str:
    verifier = PeerVerifier(admin.ca_certificate, RevocationList(), cluster_id)
    rpc = RpcClient(TlsCarrier(admin, verifier), signer=ProofSigner(admin.cert_pem, admin.key_pem))
    try:
        reply = await rpc.call(address, "token.create", TokenCreate(600, 1, role), response=TokenReply)
    finally:
        await rpc.aclose()
    return reply.token


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    root = tmp_path_factory.mktemp("perm")
    leader = NodeProcess(root / "node1", free_port(), "node1")
    config = bootstrap(leader)
    follower = NodeProcess(root / "node2", free_port(), "node2")
    join(config, leader, follower)
    wait_for(
        lambda: any(m["id"] == "node2" and m["state"] == "alive" for m in status(config)["members"]), 60, "node2 alive"
    )
    context = client_config.load(config).context()
    admin = Credentials(context.ca_pem, context.certificate_pem, context.key_pem)
    identities: dict[str, Credentials] = {"admin": admin}

    async def enroll_all() -> None:
        address = _address(leader)
        for name, role in (("op", "operator"), ("view", "viewer"), ("rogue", "node"), ("gone", "node")):
            token = await _token(config, admin, context.cluster_id, address, role)
            advertise = f"127.0.0.1:{free_port()}" if role == "node" else ""  # registered, never started
            creds, _ = await enroll(address, token, name=name, role=role, advertise=advertise)
            identities[name] = creds

    trio.run(enroll_all)
    cli("nodes", "rm", "gone", config=config, check=True)
    other = ClusterCA.create(context.cluster_id, datetime.now(UTC))
    identities["other-ca"] = issue_credentials(
        other, Identity.client(context.cluster_id, "admin"), datetime.now(UTC), role="admin"
    )
    yield Cluster(config, leader, follower, admin, context.cluster_id, identities)
    follower.stop()
    leader.stop()


def _expected(name: str, method: str) -> bool:
    peers = {
        "admin": PeerIdentity("c", "client", "admin", 1, "admin"),
        "op": PeerIdentity("c", "client", "op", 1, "operator"),
        "view": PeerIdentity("c", "client", "view", 1, "viewer"),
        "rogue": PeerIdentity("c", "node", "rogue", 1),
    }
    return PERMISSIONS[method].allows(principal_of(peers[name]))


async def _outcome(rpc: RpcClient, address, method: str) -> str:
    """'denied', 'refused' (the handshake), or 'allowed' (anything the handler itself answered)."""
    try:
        await rpc.call(address, method, b"", timeout=CALL_TIMEOUT)
    except CloudlessError as exc:
        if getattr(exc, "code", "") == "permission_denied":
            return "denied"
        if isinstance(exc, PeerRejected):
            return "refused"
        if isinstance(exc, ConnectionLost) and "refused our certificate" in exc.message:
            return "refused"
    return "allowed"


def _carrier(kind: str, creds: Credentials, cluster_id: str):
    verifier = PeerVerifier(creds.ca_certificate, RevocationList(), cluster_id)
    return TlsCarrier(creds, verifier) if kind == "tls" else QuicCarrier(creds, verifier)


@pytest.mark.parametrize("carrier", ["tls", "quic"])
@pytest.mark.parametrize("who", ["admin", "op", "view", "rogue"])
async def test_every_method_allows_exactly_the_roles_in_the_table(cluster: Cluster, carrier: str, who: str) -> None:
    creds = cluster.identities[who]
    transport = _carrier(carrier, creds, cluster.cluster_id)
    signer = ProofSigner(creds.cert_pem, creds.key_pem) if who != "rogue" else None
    rpc = RpcClient(transport, signer=signer)
    results: dict[str, str] = {}
    address = _address(cluster.follower)
    try:
        if carrier == "quic":
            await transport.__aenter__()

        async def one(method: str) -> None:
            results[method] = await _outcome(rpc, address, method)

        async with trio.open_nursery() as nursery:
            for method in PERMISSIONS:
                nursery.start_soon(one, method)
    finally:
        await rpc.aclose()
        if carrier == "quic":
            await transport.__aexit__(None, None, None)
    wrong = {m: r for m, r in results.items() if (r == "allowed") != _expected(who, m) or r == "refused"}
    assert not wrong, f"{who} over {carrier}: {wrong}"
    # The table is not vacuous for this caller: it is refused something and allowed something.
    assert "denied" in results.values() and "allowed" in results.values()


@pytest.mark.parametrize("carrier", ["tls", "quic"])
@pytest.mark.parametrize("who", ["gone", "other-ca"])
async def test_removed_nodes_and_foreign_cas_are_refused_at_the_handshake(
    cluster: Cluster, carrier: str, who: str
) -> None:
    creds = cluster.identities[who]
    transport = _carrier(carrier, creds, cluster.cluster_id)
    rpc = RpcClient(transport)
    try:
        if carrier == "quic":
            await transport.__aenter__()
        for method in ("status", "raft.read_index", "chunks.list", "token.create"):
            # Refused before any call is read: not a handler's error, not a permission verdict.
            assert await _outcome(rpc, _address(cluster.leader), method) == "refused", (who, method)
    finally:
        await rpc.aclose()
        if carrier == "quic":
            await transport.__aexit__(None, None, None)


async def test_enrollment_connections_reach_only_enrollment(cluster: Cluster) -> None:
    allowed = {m for m, rule in PERMISSIONS.items() if rule.roles == ENROLL}
    assert allowed == {"enroll.hello", "enroll.join"}
    for method in sorted(PERMISSIONS):
        connection, _ = await connect_enrollment(_address(cluster.leader))
        rpc = RpcClient(_One(connection))
        try:
            outcome = await _outcome(rpc, connection, method)
        finally:
            await connection.aclose()
        assert (outcome == "allowed") == (method in allowed), (method, outcome)


class _One:
    def __init__(self, connection) -> None:
        self.connection = connection

    async def connect(self, address):
        return self.connection


def test_a_node_certificate_used_as_a_client_config_cannot_administer(cluster: Cluster, tmp_path: Path) -> None:
    """The attack from the issue: node2's own tls/ files in a client config."""
    tls = cluster.follower.data_dir / "tls"
    context = client_config.load(cluster.config).context()
    stolen = tmp_path / "stolen.yaml"
    forged = dataclasses.replace(
        context, certificate_pem=(tls / "cert.pem").read_bytes(), key_pem=(tls / "key.pem").read_bytes()
    )
    client_config.ClientConfig(contexts={context.name: forged}, current_context=context.name).save(stolen)
    for args in (
        ("token", "create", "--role", "admin"),
        ("vars", "put", "stolen", "1"),
        ("nodes", "rm", "node1"),
    ):
        proc = cli(*args, config=stolen)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        assert "permission denied" in proc.stderr, proc.stderr
    assert cli("vars", "get", "stolen", config=cluster.config).returncode == 3
    assert status(cluster.config)["voters"] == ["node1"]  # nodes rm node1 changed nothing


async def test_forwarded_calls_act_for_the_proven_client_and_cannot_be_replayed(cluster: Cluster) -> None:
    leader = _address(cluster.leader)
    admin = cluster.identities["admin"]
    rogue = cluster.identities["rogue"]
    verifier = PeerVerifier(rogue.ca_certificate, RevocationList(), cluster.cluster_id)
    as_rogue = RpcClient(TlsCarrier(rogue, verifier))
    body = msgspec.msgpack.encode(TokenCreate(60, 1, "admin"))
    try:
        # No proof: the node acts for itself, and nodes may not create tokens.
        with pytest.raises(CloudlessError, match="permission denied"):
            await as_rogue.call(leader, "fwd.token.create", body, timeout=CALL_TIMEOUT)
        # A viewer's genuine proof: the leader authorizes the viewer, who may not either.
        viewer = cluster.identities["view"]
        viewer_proof = ProofSigner(viewer.cert_pem, viewer.key_pem)("token.create", body)
        with pytest.raises(CloudlessError, match="permission denied"):
            await as_rogue.call(leader, "fwd.token.create", body, proof=viewer_proof, timeout=CALL_TIMEOUT)
        # An admin's proof for another request does not cover this one.
        other_body = msgspec.msgpack.encode(TokenCreate(61, 1, "admin"))
        admin_proof = ProofSigner(admin.cert_pem, admin.key_pem)("token.create", other_body)
        with pytest.raises(CloudlessError, match="does not cover"):
            await as_rogue.call(leader, "fwd.token.create", body, proof=admin_proof, timeout=CALL_TIMEOUT)
        # Nor does a proof for another method.
        put_proof = ProofSigner(admin.cert_pem, admin.key_pem)("vars.put", body)
        with pytest.raises(CloudlessError, match="permission denied"):
            await as_rogue.call(leader, "fwd.token.create", body, proof=put_proof, timeout=CALL_TIMEOUT)
        # The admin's proof for exactly this call works once (the node passed it on)...
        proof = ProofSigner(admin.cert_pem, admin.key_pem)("token.create", body)
        reply = await as_rogue.call(leader, "fwd.token.create", body, proof=proof, timeout=CALL_TIMEOUT)
        assert reply
        # ...and a node that kept it cannot replay it.
        with pytest.raises(CloudlessError, match="replayed"):
            await as_rogue.call(leader, "fwd.token.create", body, proof=proof, timeout=CALL_TIMEOUT)
        # A stale proof (a clock an hour off) is refused.
        stale = ProofSigner(admin.cert_pem, admin.key_pem, clock=lambda: trio_time_offset(-3600))("token.create", body)
        with pytest.raises(CloudlessError, match="stale"):
            await as_rogue.call(leader, "fwd.token.create", body, proof=stale, timeout=CALL_TIMEOUT)
    finally:
        await as_rogue.aclose()


def trio_time_offset(seconds: float) -> float:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).timestamp()


async def test_a_node_may_forward_only_proposals_about_itself(cluster: Cluster) -> None:
    """The issue's forged proposals: a 10-year admin token and another node's allocation report."""
    from cloudless.node.replicated import ForwardedProposal
    from cloudless.state.commands import CreateToken, Proposal, PutVar, ReportAllocations, encode_proposal

    rogue = cluster.identities["rogue"]
    verifier = PeerVerifier(rogue.ca_certificate, RevocationList(), cluster.cluster_id)
    as_rogue = RpcClient(TlsCarrier(rogue, verifier))
    forged = {
        "token": CreateToken("forged01", "0" * 64, "admin", trio_time_offset(10 * 365 * 86400), 1),
        "var": PutVar("forged", "1"),
        "report": ReportAllocations("node1", ()),
    }
    try:
        for what, command in forged.items():
            proposal = encode_proposal(Proposal(command=command, now=trio_time_offset(0)))
            with pytest.raises(CloudlessError, match="permission denied") as info:
                await as_rogue.call(
                    _address(cluster.leader), "raft.propose", ForwardedProposal(proposal), timeout=CALL_TIMEOUT
                )
            assert "may" in info.value.message, what
        # Its own (empty) report is fine.
        own = encode_proposal(Proposal(command=ReportAllocations("rogue", ()), now=0.0))
        await as_rogue.call(_address(cluster.leader), "raft.propose", ForwardedProposal(own), timeout=CALL_TIMEOUT)
    finally:
        await as_rogue.aclose()
    assert cli("vars", "get", "forged", config=cluster.config).returncode == 3


@pytest.mark.parametrize("carrier", ["tls", "quic"])
async def test_removing_a_node_ends_its_open_connections_within_seconds(cluster: Cluster, carrier: str) -> None:
    name = f"doomed-{carrier}"
    address = _address(cluster.leader)
    token = await _token(cluster.config, cluster.admin, cluster.cluster_id, address, "node")
    creds, _ = await enroll(address, token, name=name, role="node", advertise=f"127.0.0.1:{free_port()}")
    transport = _carrier(carrier, creds, cluster.cluster_id)
    rpc = RpcClient(transport)
    try:
        if carrier == "quic":
            await transport.__aenter__()
        connections = {}
        for node in (cluster.leader, cluster.follower):
            connections[node.name] = conn = await transport.connect(_address(node))
            await rpc.call(conn, "pki.revocations", b"", timeout=CALL_TIMEOUT)  # in use, and allowed
        await trio.to_thread.run_sync(lambda: cli("nodes", "rm", name, config=cluster.config, check=True))
        with trio.fail_after(5):
            for conn in connections.values():
                # Nodes never open streams to us: this returns only once the connection ends.
                with pytest.raises(ConnectionLost):
                    await conn.accept_stream()
        for conn in connections.values():
            with pytest.raises(CloudlessError):
                await rpc.call(conn, "pki.revocations", b"", timeout=CALL_TIMEOUT)
        # And it cannot come back on a new connection.
        with pytest.raises((PeerRejected, ConnectionLost)):
            await transport.connect(_address(cluster.follower))
    finally:
        await rpc.aclose()
        if carrier == "quic":
            await transport.__aexit__(None, None, None)


def test_users_get_role_scoped_certificates_and_removal_revokes_them(cluster: Cluster, tmp_path: Path) -> None:
    alice = tmp_path / "alice.yaml"
    added = json.loads(
        cli(
            "users",
            "add",
            "alice",
            "--role",
            "viewer",
            "--out",
            str(alice),
            "--json",
            config=cluster.config,
            check=True,
        ).stdout
    )
    assert added["role"] == "viewer" and alice.exists()
    assert (alice.stat().st_mode & 0o777) == 0o600
    assert cli("status", config=alice).returncode == 0
    denied = cli("vars", "put", "k", "v", config=alice)
    assert denied.returncode == 1 and "permission denied" in denied.stderr and "viewer" in denied.stderr
    listed = json.loads(cli("users", "ls", "--json", config=cluster.config, check=True).stdout)["items"]
    assert {(u["name"], u["role"]) for u in listed} >= {("admin", "admin"), ("alice", "viewer")}
    # A viewer cannot add users.
    assert (
        cli("users", "add", "mallory", "--role", "admin", "--out", str(tmp_path / "m.yaml"), config=alice).returncode
        == 1
    )
    # An open stream of alice's ends when she is removed.
    env = dict(os.environ, CLOUDLESS_CONFIG=str(alice))
    stream = subprocess.Popen(
        [*CLI, "events", "-f"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: cli("events", "--last", "1", config=alice).returncode == 0, 20, "alice reads events")
        time.sleep(1.0)  # the follower is connected by now
        assert stream.poll() is None
        cli("users", "rm", "alice", config=cluster.config, check=True)
        stream.wait(timeout=10)
        assert stream.returncode != 0
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    assert cli("status", config=alice).returncode != 0
    # The name is not reusable while her certificate could still be valid.
    again = cli("users", "add", "alice", "--role", "admin", "--out", str(tmp_path / "a2.yaml"), config=cluster.config)
    assert again.returncode == 4, again.stderr


async def test_a_removed_node_name_cannot_be_reused(cluster: Cluster) -> None:
    address = _address(cluster.leader)
    token = await _token(cluster.config, cluster.admin, cluster.cluster_id, address, "node")
    await enroll(address, token, name="phoenix", role="node", advertise=f"127.0.0.1:{free_port()}")
    await trio.to_thread.run_sync(lambda: cli("nodes", "rm", "phoenix", config=cluster.config, check=True))
    token = await _token(cluster.config, cluster.admin, cluster.cluster_id, address, "node")
    with pytest.raises(CloudlessError, match="removed"):
        await enroll(address, token, name="phoenix", role="node", advertise=f"127.0.0.1:{free_port()}")


def test_tokens_can_be_listed_without_secrets_and_withdrawn(cluster: Cluster) -> None:
    created = json.loads(cli("token", "create", "--json", config=cluster.config, check=True).stdout)
    listed = json.loads(cli("token", "ls", "--json", config=cluster.config, check=True).stdout)["items"]
    assert created["id"] in [t["id"] for t in listed]
    assert created["token"].split(".")[2] not in json.dumps(listed)  # the secret is nowhere
    cli("token", "rm", created["id"], config=cluster.config, check=True)
    listed = json.loads(cli("token", "ls", "--json", config=cluster.config, check=True).stdout)["items"]
    assert created["id"] not in [t["id"] for t in listed]

    async def use() -> None:
        await enroll(_address(cluster.leader), created["token"], name="late", role="node", advertise="127.0.0.1:9")

    with pytest.raises(CloudlessError):
        trio.run(use)


async def test_raft_ignores_messages_from_nodes_outside_the_configuration(cluster: Cluster) -> None:
    """A registered node that is not a Raft member cannot push the term up or call an election."""
    from cloudless.node.replicated import RaftBatch
    from cloudless.raft.messages import Heartbeat, RequestVote, encode_message

    before = await trio.to_thread.run_sync(lambda: status(cluster.config))
    rogue = cluster.identities["rogue"]
    verifier = PeerVerifier(rogue.ca_certificate, RevocationList(), cluster.cluster_id)
    as_rogue = RpcClient(TlsCarrier(rogue, verifier))
    vote = RequestVote("rogue", "node1", before["term"] + 1000, 10**9, before["term"] + 999)
    # A heartbeat of a far higher term would make the leader step down and follow "rogue".
    heartbeat = Heartbeat("rogue", "node1", before["term"] + 1000, 0)
    try:
        await as_rogue.call(
            _address(cluster.leader),
            "raft.batch",
            RaftBatch([encode_message(vote), encode_message(heartbeat)]),
            timeout=CALL_TIMEOUT,
        )
    finally:
        await as_rogue.aclose()
    await trio.sleep(0.5)
    after = await trio.to_thread.run_sync(lambda: status(cluster.config))
    assert after["term"] == before["term"] and after["leader"] == "node1"


def test_an_oversized_workload_spec_is_refused_with_a_clear_error_and_changes_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    import yaml

    spec = {"name": "huge", "image": "busybox", "env": {f"K{i}": "x" * 32 * 1024 for i in range(256)}}
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = cli("apply", "-f", str(path), config=cluster.config, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "env" in proc.stderr and "limit" in proc.stderr
    listed = json.loads(cli("ps", "--json", config=cluster.config, check=True).stdout)["items"]
    assert "huge" not in [w["name"] for w in listed]


def test_calls_through_a_follower_act_for_the_client(cluster: Cluster) -> None:
    """Unary and streamed calls that a follower forwards to the leader are authorized as the client."""
    follower = ["--endpoint", cluster.follower.address]
    put = cli("vars", "put", "via-follower", "1", *follower, config=cluster.config)
    assert put.returncode == 0, put.stderr
    missing = cli("logs", "no-such-workload", *follower, config=cluster.config)
    assert missing.returncode == 3, missing.stderr  # not found at the leader, not "permission denied"
    tokens = cli("token", "ls", "--json", *follower, config=cluster.config)
    assert tokens.returncode == 0, tokens.stderr
