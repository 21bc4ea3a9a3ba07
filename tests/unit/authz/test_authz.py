from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.authz import PERMISSIONS, Authorizer, CallGate, PermissionDenied, ProofSigner, ProofVerifier, is_listed
from cloudless.authz.proof import CallerProof
from cloudless.authz.roles import principal_of
from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials, role_of
from cloudless.pki.errors import InvalidIdentity
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import PeerIdentity
from cloudless.transport.rpc import RpcServer

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki():
    ca = ClusterCA.create("c1", NOW)
    revocations = RevocationList()
    verifier = PeerVerifier(ca.certificate, revocations, "c1", clock=lambda: NOW)
    creds = {
        role: issue_credentials(ca, Identity.client("c1", role), NOW, role=role)
        for role in ("admin", "operator", "viewer")
    }
    creds["node"] = issue_credentials(ca, Identity.node("c1", "n1"), NOW)
    return ca, verifier, revocations, creds


def peer(kind: str, role: str = "") -> PeerIdentity:
    return PeerIdentity("c1", kind, "x", 1, role)


def test_client_certificates_carry_their_role_and_nodes_none(pki) -> None:
    ca, verifier, _, creds = pki
    for role in ("admin", "operator", "viewer"):
        assert role_of(creds[role].certificate) == role
        assert verifier.verify([creds[role].certificate]).role == role
    assert verifier.verify([creds["node"].certificate]).role == ""
    # Least privilege when the issuer names no role.
    assert role_of(issue_credentials(ca, Identity.client("c1", "anon"), NOW).certificate) == "viewer"
    with pytest.raises(InvalidIdentity):
        issue_credentials(ca, Identity.client("c1", "x"), NOW, role="root")
    with pytest.raises(InvalidIdentity):
        issue_credentials(ca, Identity.node("c1", "x"), NOW, role="admin")


def test_roles_nest_for_clients_and_nodes_hold_no_client_right() -> None:
    authorizer = Authorizer()
    admin, operator, viewer, node = (
        principal_of(peer("client", "admin")),
        principal_of(peer("client", "operator")),
        principal_of(peer("client", "viewer")),
        principal_of(peer("node")),
    )
    for method, rule in PERMISSIONS.items():
        if rule.allows(viewer):
            assert rule.allows(operator) and rule.allows(admin), method
        if rule.allows(operator):
            assert rule.allows(admin), method
        assert not (rule.allows(node) and rule.allows(viewer)), method
    with pytest.raises(PermissionDenied, match="may not create bootstrap tokens"):
        authorizer.check_caller(node, "token.create")
    with pytest.raises(PermissionDenied, match="may not write variables"):
        authorizer.check_caller(viewer, "vars.put")
    with pytest.raises(PermissionDenied, match="may not send Raft messages"):
        authorizer.check_caller(admin, "raft.batch")
    authorizer.check_caller(operator, "vars.put")
    authorizer.check_caller(node, "raft.batch")


def test_unlisted_methods_are_refused_and_cannot_be_registered() -> None:
    with pytest.raises(PermissionDenied, match="no such permission"):
        Authorizer().check_caller(principal_of(peer("client", "admin")), "debug.shell")
    with pytest.raises(PermissionDenied):  # no role at all: a client certificate without one
        Authorizer().check_caller(principal_of(peer("client", "")), "status")
    server = RpcServer(listed=is_listed)

    async def handler(ctx, req):  # pragma: no cover - never called
        return None

    server.unary("status")(handler)
    server.unary("fwd.status")(handler)
    with pytest.raises(ValueError, match="permission table"):
        server.unary("debug.shell")(handler)
    with pytest.raises(ValueError, match="permission table"):
        server.unary("fwd.debug.shell")(handler)


def test_forwarding_is_for_nodes_only() -> None:
    gate = CallGate(ProofVerifier(verifier=None))  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="forward calls"):
        gate(peer("client", "admin"), "fwd.status", b"", b"")
    # A node forwarding without a proof acts for itself.
    with pytest.raises(PermissionDenied, match="may not read the cluster status"):
        gate(peer("node"), "fwd.status", b"", b"")


def _gate(verifier, clock):
    return CallGate(ProofVerifier(verifier, clock=clock))


def test_a_forwarded_call_acts_for_the_client_its_proof_proves(pki) -> None:
    _, verifier, _, creds = pki
    now = NOW.timestamp()
    gate = _gate(verifier, lambda: now)
    sign = ProofSigner(creds["viewer"].cert_pem, creds["viewer"].key_pem, clock=lambda: now)
    principal = gate(peer("node"), "fwd.status", b"body", sign("status", b"body"))
    assert (principal.kind, principal.role, principal.name) == ("client", "viewer", "viewer")
    with pytest.raises(PermissionDenied, match="may not write variables"):
        gate(peer("node"), "fwd.vars.put", b"body", sign("vars.put", b"body"))
    with pytest.raises(PermissionDenied, match="does not cover"):
        gate(peer("node"), "fwd.status", b"other", sign("status", b"body"))
    with pytest.raises(PermissionDenied, match="is for 'status'"):
        gate(peer("node"), "fwd.nodes.list", b"body", sign("status", b"body"))
    proof = sign("status", b"again")
    gate(peer("node"), "fwd.status", b"again", proof)
    with pytest.raises(PermissionDenied, match="replayed"):
        gate(peer("node"), "fwd.status", b"again", proof)


def test_proofs_from_stale_revoked_foreign_or_node_certificates_prove_nobody(pki) -> None:
    ca, verifier, revocations, creds = pki
    now = NOW.timestamp()
    gate = _gate(verifier, lambda: now)
    stale = ProofSigner(creds["admin"].cert_pem, creds["admin"].key_pem, clock=lambda: now - 3600)
    with pytest.raises(PermissionDenied, match="stale"):
        gate(peer("node"), "fwd.status", b"", stale("status", b""))
    other = ClusterCA.create("c1", NOW)
    foreign = issue_credentials(other, Identity.client("c1", "admin"), NOW, role="admin")
    with pytest.raises(PermissionDenied, match="refused"):
        gate(
            peer("node"),
            "fwd.status",
            b"",
            ProofSigner(foreign.cert_pem, foreign.key_pem, clock=lambda: now)("status", b""),
        )
    node_sign = ProofSigner(creds["node"].cert_pem, creds["node"].key_pem, clock=lambda: now)
    with pytest.raises(PermissionDenied, match="for clients"):
        gate(peer("node"), "fwd.status", b"", node_sign("status", b""))
    # A proof signed with another key than the certificate's.
    forged = msgspec.msgpack.decode(
        ProofSigner(creds["viewer"].cert_pem, creds["viewer"].key_pem, clock=lambda: now)("status", b""),
        type=CallerProof,
    )
    admin_cert = msgspec.msgpack.decode(
        ProofSigner(creds["admin"].cert_pem, creds["admin"].key_pem, clock=lambda: now)("status", b""),
        type=CallerProof,
    ).certificate
    swapped = msgspec.msgpack.encode(msgspec.structs.replace(forged, certificate=admin_cert))
    with pytest.raises(PermissionDenied, match="signature does not verify"):
        gate(peer("node"), "fwd.status", b"", swapped)
    revoked = issue_credentials(ca, Identity.client("c1", "leaver"), NOW, role="admin")
    revoked_sign = ProofSigner(revoked.cert_pem, revoked.key_pem, clock=lambda: now)
    gate(peer("node"), "fwd.status", b"", revoked_sign("status", b""))
    assert revocations.add(revoked.serial, NOW + timedelta(days=30))
    with pytest.raises(PermissionDenied, match="refused"):
        gate(peer("node"), "fwd.status", b"", revoked_sign("status", b""))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000))
def test_arbitrary_proof_bytes_are_refused_cleanly(data: bytes) -> None:
    gate = _gate(verifier=None, clock=lambda: 0.0)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied):
        gate(peer("node"), "fwd.status", b"", data or b"\x00")


def test_the_state_machine_applies_only_what_the_proposing_node_may_propose() -> None:
    from cloudless.state.commands import (
        CreateToken,
        Proposal,
        PutVar,
        Rejected,
        ReportAllocations,
        encode_proposal,
        node_may_propose,
    )
    from cloudless.state.fsm import StateMachine

    assert node_may_propose(ReportAllocations("n1", ()), "n1") is None
    assert "only its own" in node_may_propose(ReportAllocations("n2", ()), "n1")
    assert "may not propose PutVar" in node_may_propose(PutVar("k", "v"), "n1")
    fsm = StateMachine()
    forged = Proposal(command=PutVar("k", "v"), now=1.0, proposer="n1")
    result = fsm.apply(1, encode_proposal(forged))
    assert isinstance(result, Rejected) and result.kind == "permission_denied"
    assert fsm.get_var("k") is None
    token = Proposal(command=CreateToken("abcdef", "0" * 64, "admin", 2e9, 1), now=1.0, proposer="n1")
    assert isinstance(fsm.apply(2, encode_proposal(token)), Rejected)
    assert not fsm.tokens
    # The same command from the leader (no proposer) applies.
    fsm.apply(3, encode_proposal(Proposal(command=PutVar("k", "v"), now=1.0)))
    assert fsm.get_var("k") is not None


def test_autopilot_never_chooses_an_untrusted_device_however_good() -> None:
    from cloudless.coordinator.autopilot import AutopilotConfig, Candidate, choose_voters

    config = AutopilotConfig(stabilization_s=0)
    best_device = Candidate("phone", "alive", power="ac", network="wired", alive_since=-1e6, trusted=False)
    others = [Candidate(f"vps{i}", "alive", power="battery", battery_pct=90, alive_since=0) for i in range(2)]
    voters, _, ineligible = choose_voters([best_device, *others], 10.0, config)
    assert "phone" not in voters
    assert "not trusted" in ineligible["phone"]


def test_ca_rotation_calls_are_admin_only_and_each_identity_reads_its_own_bundle_call() -> None:
    authorizer = Authorizer()
    admin, operator, viewer, node = (
        principal_of(peer("client", "admin")),
        principal_of(peer("client", "operator")),
        principal_of(peer("client", "viewer")),
        principal_of(peer("node")),
    )
    for method in ("ca.rotate", "ca.status"):
        authorizer.check_caller(admin, method)
        for who in (operator, viewer, node):
            with pytest.raises(PermissionDenied, match=r"may not (rotate the cluster CA|read the CA rotation status)"):
                authorizer.check_caller(who, method)
    for who in (admin, operator, viewer):
        authorizer.check_caller(who, "pki.bundle")
        authorizer.check_caller(who, "pki.renew_client")
        with pytest.raises(PermissionDenied, match="may not read the cluster's CA bundle"):
            authorizer.check_caller(who, "pki.trust")
    authorizer.check_caller(node, "pki.trust")
    with pytest.raises(PermissionDenied, match="may not renew a client certificate"):
        authorizer.check_caller(node, "pki.renew_client")
    with pytest.raises(PermissionDenied, match="may not read the cluster's CA bundle"):
        authorizer.check_caller(node, "pki.bundle")


def test_a_cached_caller_certificate_is_rechecked_for_revocation_expiry_and_trust(pki) -> None:
    ca, _, _, _ = pki
    revocations = RevocationList()
    now = [NOW.timestamp()]
    verifier = PeerVerifier(ca.certificate, revocations, "c1", clock=lambda: datetime.fromtimestamp(now[0], UTC))
    gate = _gate(verifier, lambda: now[0])
    creds = issue_credentials(ca, Identity.client("c1", "cached"), NOW, timedelta(hours=1), role="viewer")
    sign = ProofSigner(creds.cert_pem, creds.key_pem, clock=lambda: now[0])
    gate(peer("node"), "fwd.status", b"", sign("status", b""))  # checked against the CA, cached
    gate(peer("node"), "fwd.status", b"", sign("status", b""))  # served from the cache
    other = ClusterCA.create("c1", NOW)
    verifier.trust([other.certificate])  # the CA rotated away from ours
    with pytest.raises(PermissionDenied, match="refused"):
        gate(peer("node"), "fwd.status", b"", sign("status", b""))
    verifier.trust([ca.certificate])
    gate(peer("node"), "fwd.status", b"", sign("status", b""))
    now[0] += 2 * 3600  # past the certificate's expiry
    with pytest.raises(PermissionDenied, match="refused"):
        gate(peer("node"), "fwd.status", b"", sign("status", b""))
