"""The permission table: every RPC method, who may call it, and what it does.

Default deny: a method missing here is refused for everybody, and
tests/unit/authz/test_permission_table.py fails if a registered method is
missing. Roles nest for clients (admin ⊇ operator ⊇ viewer); `node` is a
separate role that no client holds and that holds no client right, so a
stolen device certificate cannot act as a user.

`fwd.<method>` is a follower handing a client's call to the leader. Only a
node may make it; the leader then authorizes the *original caller*, proven
by the caller's own signature carried with the call (see `authz.proof`), or,
without one, the forwarding node itself against `<method>`'s rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloudless.authz.roles import ENROLLEE, Principal
from cloudless.errors import CloudlessError

NODE = frozenset({"node"})
ADMIN = frozenset({"admin"})
OPERATE = frozenset({"admin", "operator"})
VIEW = frozenset({"admin", "operator", "viewer"})
ENROLL = frozenset({ENROLLEE})

FORWARD_PREFIX = "fwd."


class PermissionDenied(CloudlessError):
    """Exit code 1, as the issue's contract says: the call was understood and refused."""

    code = "permission_denied"
    exit_code = 1


@dataclass(frozen=True, slots=True)
class Rule:
    roles: frozenset[str]
    action: str  # "may not <action>" in refusals

    def allows(self, principal: Principal) -> bool:
        return principal.role in self.roles


def _rules(roles: frozenset[str], **actions: str) -> dict[str, Rule]:
    return {name.replace("__", "."): Rule(roles, action) for name, action in actions.items()}


PERMISSIONS: dict[str, Rule] = {
    # Enrollment connections: the only calls a certificate-less joiner can make.
    "enroll.hello": Rule(ENROLL, "ask for the cluster CA"),
    "enroll.join": Rule(ENROLL, "join with a bootstrap token"),
    # The CA bundle (one CA, two during a rotation): clients learn the next CA
    # through it (nodes outside Raft through pki.trust); public key material.
    "pki.bundle": Rule(VIEW, "read the cluster's CA bundle"),
    # A client re-issues its own certificate: same identity and role, new key.
    "pki.renew_client": Rule(VIEW, "renew a client certificate"),
    # Node-to-node plumbing. Handlers narrow further (own allocations only,
    # Raft traffic only from configuration members, own certificate only).
    **_rules(
        NODE,
        gossip__stream="exchange gossip state over a stream",
        gossip__keys="read the gossip keyring and nodes' public keys",
        raft__batch="send Raft messages",
        raft__subscribe="subscribe to Raft messages",
        raft__propose="forward Raft proposals",
        raft__read_index="ask the leader for a read index",
        enroll__forward="forward a join to the leader",
        pki__renew="renew a node certificate",
        pki__revocations="read the revocation list",
        pki__trust="read the cluster's CA bundle",
        allocations__watch="watch a node's allocations",
        allocations__report="report a node's allocations",
        agent__logs="read container logs from an agent",
        agent__exec="run commands in containers through an agent",
        chunks__has="query stored chunks",
        chunks__put="store chunks",
        chunks__get="read chunks",
        chunks__drop="drop chunks",
        chunks__summary="summarize stored chunks",
        chunks__pull="make a node pull chunks",
        chunks__list="list stored chunks",
        blobs__catalog__read="read the blob catalog",
    ),
    # Read-only client calls.
    **_rules(
        VIEW,
        status="read the cluster status",
        nodes__list="list nodes",
        vars__get="read variables",
        vars__ls="list variables",
        events="read events",
        workloads__ps="list workloads",
        workloads__inspect="inspect workloads",
        workloads__logs="read workload logs",
        blobs__bucket__head="read buckets",
        blobs__bucket__list="list buckets",
        blobs__object__head="read objects",
        blobs__object__list="list objects",
        blobs__object__get="read objects",
        images__list="list the cluster's images",
    ),
    # Day-to-day operation: workloads, images, blobs, variables.
    **_rules(
        OPERATE,
        vars__put="write variables",
        vars__cas="write variables",
        vars__rm="delete variables",
        workloads__run="run workloads",
        workloads__dry_run="preview workload placements",  # read-only, for those who may apply
        workloads__scale="scale workloads",
        workloads__update="update workloads",
        workloads__stop="stop workloads",
        workloads__exec="run commands in containers",
        blobs__bucket__create="create buckets",
        blobs__object__rm="delete objects",
        blobs__object__put="write objects",
        blobs__upload__create="write objects",
        blobs__upload__part="write objects",
        blobs__upload__complete="write objects",
        blobs__upload__abort="write objects",
        # As `image import` (blob writes) and `run` (a node pulls what it is told):
        # a node fetches from the registry the caller names.
        images__pull="pull images into the cluster",
    ),
    # Cluster administration: identities, membership, credentials.
    **_rules(
        ADMIN,
        token__create="create bootstrap tokens",
        token__list="list bootstrap tokens",
        token__rm="withdraw bootstrap tokens",
        users__add="add users",
        users__list="list users",
        users__rm="remove users",
        nodes__rm="remove nodes",
        ca__rotate="rotate the cluster CA",
        ca__status="read the CA rotation status",
        blobs__keys__create="create S3 access keys",
        blobs__keys__list="list S3 access keys",
        blobs__keys__rm="remove S3 access keys",
    ),
}


def is_listed(method: str) -> bool:
    """Whether `method` (or, for `fwd.<m>`, `m`) has a rule: RpcServer's `listed` check."""
    if method.startswith(FORWARD_PREFIX):
        method = method[len(FORWARD_PREFIX) :]
    return method in PERMISSIONS


def denied(principal: Principal, action: str) -> PermissionDenied:
    return PermissionDenied(
        f"permission denied: {principal} may not {action}", identity=principal.uri, role=principal.role or "none"
    )


class Authorizer:
    """The check an RPC server runs before it decodes a request."""

    def __init__(self, table: dict[str, Rule] | None = None) -> None:
        self.table = PERMISSIONS if table is None else table

    def rule(self, method: str) -> Rule | None:
        if method.startswith(FORWARD_PREFIX):
            return self.table.get(method[len(FORWARD_PREFIX) :])
        return self.table.get(method)

    def check_caller(self, principal: Principal, method: str) -> None:
        """May `principal`, the verified peer of this connection, call `method` here?

        For `fwd.*` the peer must be a node; whom it acts for is checked by
        `check_forwarded` once the caller's proof is read.
        """
        rule = self.rule(method)
        if rule is None:
            raise denied(principal, f"call {method[:128]!r} (no such permission)")
        if method.startswith(FORWARD_PREFIX):
            if principal.role != "node":
                raise denied(principal, f"forward calls ({method[:128]})")
            return
        if not rule.allows(principal):
            raise denied(principal, rule.action)

    def check_forwarded(self, original: Principal, method: str) -> None:
        rule = self.rule(method)
        if rule is None or not rule.allows(original):
            raise denied(original, rule.action if rule else f"call {method[:128]!r}")
