"""The replicated state machine's vocabulary: commands proposed through Raft
and the results their application returns.

A command is applied on every replica, so it must be deterministic: anything
that depends on time carries the proposer's clock reading (`Proposal.now`)
instead of reading one at apply time.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from cloudless.errors import InvalidInput

FORMAT_VERSION = 1

VAR_KEY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,255}$"
MAX_VAR_VALUE = 512 * 1024

VarKey = Annotated[str, msgspec.Meta(pattern=VAR_KEY_PATTERN)]
VarValue = Annotated[str, msgspec.Meta(max_length=MAX_VAR_VALUE)]
Index = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
# Certificate serials are up to 159 bits: carried as lowercase hex (msgpack
# integers stop at 64 bits).
Serial = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{1,40}$")]
# A node certificate's public key (DER SubjectPublicKeyInfo, P-256: 91 bytes):
# gossip checks a member's signed claims about itself against it.
PublicKey = Annotated[bytes, msgspec.Meta(max_length=256)]
# A CA's key id (SubjectKeyIdentifier, SHA-1: 20 bytes) as hex; "" when not known.
CAKeyId = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{40})?$")]
MIN_CA_OVERLAP_S = 2.0  # tests; operators use hours
MAX_CA_OVERLAP_S = 366 * 86400.0
Labels = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=63)], Annotated[str, msgspec.Meta(max_length=253)]],
    msgspec.Meta(max_length=64),
]


class Command(msgspec.Struct, frozen=True, tag_field="c", forbid_unknown_fields=True):
    pass


class PutVar(Command, tag="var.put"):
    key: VarKey
    value: VarValue


class CasVar(Command, tag="var.cas"):
    """Write only if the key's modify index is `expected_index` (0: must not exist)."""

    key: VarKey
    value: VarValue
    expected_index: Index


class DeleteVar(Command, tag="var.rm"):
    key: VarKey
    expected_index: Index | None = None


class CreateToken(Command, tag="token.create"):
    token_id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]{6,32}$")]
    secret_hash: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    role: Annotated[str, msgspec.Meta(pattern=r"^(node|admin|operator|viewer)$")]
    expires_at: float
    max_uses: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    # "coordinator": nodes enrolled with it may become voters and hold the CA key.
    trust: Annotated[str, msgspec.Meta(pattern=r"^(|coordinator)$")] = ""


class ConsumeToken(Command, tag="token.consume"):
    """Spend one use of a token; the leader checked the secret before proposing."""

    token_id: str
    role: Annotated[str, msgspec.Meta(pattern=r"^(node|admin|operator|viewer)$")]


class RegisterNode(Command, tag="node.register"):
    node_id: Name
    address: Annotated[str, msgspec.Meta(max_length=300)]
    certificate_serial: Serial
    certificate_not_after: float
    region: Annotated[str, msgspec.Meta(max_length=63)] = ""
    zone: Annotated[str, msgspec.Meta(max_length=63)] = ""
    labels: Labels = {}
    trusted: bool = False  # enrolled with a coordinator-trust token (or the bootstrap node)
    public_key: PublicKey = b""  # of this certificate; b"" from leaders before signed gossip
    issuer: CAKeyId = ""  # key id (hex) of the CA that signed it; a CA rotation counts the re-issued


class RemoveNode(Command, tag="node.remove"):
    """Forget a node and revoke every certificate it was issued."""

    node_id: Name


class RecordCertificate(Command, tag="cert.record"):
    """A renewed certificate for a known node (so removal can revoke it)."""

    node_id: Name
    serial: Serial
    not_after: float
    public_key: PublicKey = b""  # of the renewed certificate (renewal makes a new key)
    issuer: CAKeyId = ""  # key id (hex) of the CA that signed it


class RevokeCertificate(Command, tag="cert.revoke"):
    serial: Serial
    not_after: float


class StoreClusterCA(Command, tag="ca.store"):
    """The cluster CA, replicated so any coordinator can issue certificates.

    Its key only sealed (pki.custody): the key-encryption key never enters Raft.
    """

    cluster_id: Name
    certificate_pem: Annotated[bytes, msgspec.Meta(max_length=8192)]
    sealed_key: Annotated[bytes, msgspec.Meta(max_length=8192)]


class BeginCARotation(Command, tag="ca.rotate"):
    """Phase 1 of a CA rotation: trust a new CA beside the active one.

    The new CA's key is sealed like the first one's (pki.custody). From
    `overlap_s / 2` after this the leader activates it (`ActivateNextCA`,
    phase 2: it signs, everyone re-issues); after `overlap_s`, once every
    registered node holds a certificate from it, the old CA is retired
    (`RetireCA`, phase 3).
    """

    cluster_id: Name
    certificate_pem: Annotated[bytes, msgspec.Meta(max_length=8192)]
    sealed_key: Annotated[bytes, msgspec.Meta(max_length=8192)]
    overlap_s: Annotated[float, msgspec.Meta(ge=MIN_CA_OVERLAP_S, le=MAX_CA_OVERLAP_S)]
    # The active CA's signature over the new CA (pki.bundle.endorse): checked at
    # apply, and by everyone who learns the new CA from a peer.
    endorsement: Annotated[bytes, msgspec.Meta(max_length=160)] = b""


class ActivateNextCA(Command, tag="ca.activate"):
    """Phase 2: the next CA (named by its key id) signs from now on; the previous stays trusted."""

    key_id: CAKeyId


class RetireCA(Command, tag="ca.retire"):
    """Phase 3: drop the previous CA (named by its key id) from the trust bundle."""

    key_id: CAKeyId


class SetGossipKeyring(Command, tag="gossip.keyring"):
    """The AES-256-GCM keys gossip packets are sealed with; the first is primary.

    Rotation (after a node is removed): the leader proposes [new, old] (every
    member seals with the new key, still opens the old), then [new] once
    GOSSIP_KEY_OVERLAP has passed (coordinator)."""

    keys: Annotated[
        list[Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]], msgspec.Meta(min_length=1, max_length=8)
    ]


# Workloads and allocations -----------------------------------------------------
# (defined here, before the union; see cloudless/state/workload.py for the spec)

from cloudless.state.workload import Allocation, WorkloadSpec  # noqa: E402

AllocationIdText = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")]
WorkloadNameText = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
MAX_BATCH = 100_000


class SubmitWorkload(Command, tag="workload.submit"):
    """Create a workload or change its spec; the state machine numbers the version.

    An identical spec (apart from `version`) is a no-op; a stopped workload
    submitted again runs again.
    """

    spec: WorkloadSpec


class ScaleWorkload(Command, tag="workload.scale"):
    name: WorkloadNameText
    replicas: Annotated[int, msgspec.Meta(ge=0, le=100_000)]


class StopWorkload(Command, tag="workload.stop"):
    """Stop every replica; the workload stays listed as stopped until submitted again."""

    name: WorkloadNameText


class AllocationReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a node's agent observed of one allocation."""

    id: AllocationIdText
    state: Annotated[str, msgspec.Meta(pattern=r"^(pending|starting|running|exited|failed|lost)$")]
    exit_code: int | None = None
    restarts: Annotated[int, msgspec.Meta(ge=0)] = 0
    health: Annotated[str, msgspec.Meta(pattern=r"^(|starting|healthy|unhealthy)$")] = ""
    message: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class ReportAllocations(Command, tag="alloc.report"):
    """A batch of one node's observations; reports for allocations of another node are ignored."""

    node: Name
    reports: Annotated[tuple[AllocationReport, ...], msgspec.Meta(max_length=MAX_BATCH)]


class CommitPlan(Command, tag="alloc.plan"):
    """One controller decision round, committed as one entry.

    `create`: new pending allocations (`replaces`: allocation id → the one it
    reschedules); `stop`: allocations whose desired state becomes stop;
    `lost`: allocations of dead nodes; `forget`: terminal allocations dropped
    from the state; `explanations`: placement lines per workload for inspect;
    `stable`: workload → version whose rollout completed healthy; `revert`:
    workload → the failed version to roll back from (to its stable version);
    `failed`: workload → a failed version to hold (no auto-revert).
    """

    create: Annotated[tuple[Allocation, ...], msgspec.Meta(max_length=MAX_BATCH)] = ()
    replaces: dict[AllocationIdText, AllocationIdText] = {}
    stop: Annotated[tuple[AllocationIdText, ...], msgspec.Meta(max_length=MAX_BATCH)] = ()
    lost: Annotated[tuple[AllocationIdText, ...], msgspec.Meta(max_length=MAX_BATCH)] = ()
    forget: Annotated[tuple[AllocationIdText, ...], msgspec.Meta(max_length=MAX_BATCH)] = ()
    explanations: dict[WorkloadNameText, tuple[str, ...]] = {}
    stable: dict[WorkloadNameText, int] = {}
    revert: dict[WorkloadNameText, int] = {}
    failed: dict[WorkloadNameText, int] = {}  # workload → version held after a failed rollout


class DeleteToken(Command, tag="token.rm"):
    token_id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]{6,32}$")]


class RecordClientCertificate(Command, tag="client.cert"):
    """A client certificate the CA issued (a user added, a client enrolled), so it can be listed and revoked."""

    name: Name
    role: Annotated[str, msgspec.Meta(pattern=r"^(admin|operator|viewer)$")]
    serial: Serial
    not_after: float
    issuer: CAKeyId = ""  # key id (hex) of the CA that signed it


class RemoveClient(Command, tag="client.remove"):
    """Forget a client identity and revoke every certificate it holds."""

    name: Name


class BlobCatalogCommand(Command, tag="blob.catalog"):
    """One blob catalog change (`cloudless.blobs.catalog.encode_command`), applied by the FSM's `Catalog`."""

    command: bytes


CommandUnion = (
    PutVar
    | CasVar
    | DeleteVar
    | CreateToken
    | ConsumeToken
    | DeleteToken
    | RecordClientCertificate
    | RemoveClient
    | RegisterNode
    | RemoveNode
    | RecordCertificate
    | RevokeCertificate
    | StoreClusterCA
    | BeginCARotation
    | ActivateNextCA
    | RetireCA
    | SetGossipKeyring
    | SubmitWorkload
    | ScaleWorkload
    | StopWorkload
    | ReportAllocations
    | CommitPlan
    | BlobCatalogCommand
)


class Proposal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What goes into a Raft entry.

    (`client_id`, `seq`) make retries idempotent: a command whose sequence
    number a session has already applied returns the recorded result instead
    of applying twice (Raft thesis §6.3). `client_id` "" opts out.
    """

    command: CommandUnion
    now: float
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    seq: Index = 0
    version: int = FORMAT_VERSION
    # "" when the leader proposed it; the node's name when a node forwarded it
    # (stamped by the leader, never by the node): the FSM then applies only
    # what `node_may_propose` allows that node.
    proposer: Annotated[str, msgspec.Meta(max_length=64)] = ""


# Results --------------------------------------------------------------------


class Result(msgspec.Struct, frozen=True, tag_field="r"):
    pass


class VarResult(Result, tag="var"):
    key: str
    value: str
    index: int


class Deleted(Result, tag="deleted"):
    key: str
    index: int


class Done(Result, tag="done"):
    index: int


class Rejected(Result, tag="rejected"):
    """The command was valid but its precondition failed; nothing changed.

    `kind` maps to an exit code: conflict (4), not_found (3), invalid (2),
    failed (1).
    """

    kind: str
    message: str
    current_index: int = 0


class BlobResult(Result, tag="blob"):
    """What `Catalog.apply` returned (a stored manifest, a bool or None), msgpack-encoded."""

    index: int
    value: bytes


ResultUnion = VarResult | Deleted | Done | Rejected | BlobResult

_proposal_encoder = msgspec.msgpack.Encoder()
_proposal_decoder = msgspec.msgpack.Decoder(Proposal)
_result_decoder = msgspec.msgpack.Decoder(ResultUnion)


class InvalidCommand(InvalidInput):
    pass


def node_may_propose(command: Command, node: str) -> str | None:
    """Why node `node` may not forward `command` (None: it may).

    A node is trusted with nothing but itself: it reports its own
    allocations and commits the blob catalog entries of the writes it served.
    Everything else (variables, tokens, workloads, membership, the CA) is
    proposed by the leader on behalf of a caller it has authorized.
    """
    if isinstance(command, ReportAllocations):
        if command.node != node:
            return f"node {node} may report only its own allocations, not {command.node}'s"
        return None
    if isinstance(command, BlobCatalogCommand):
        return None
    return f"node {node} may not propose {type(command).__name__}"


def encode_proposal(proposal: Proposal) -> bytes:
    return _proposal_encoder.encode(proposal)


def decode_proposal(data: bytes) -> Proposal:
    try:
        proposal = _proposal_decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise InvalidCommand(f"invalid command: {exc}") from None
    if proposal.version != FORMAT_VERSION:
        raise InvalidCommand(f"unsupported command format version {proposal.version}")
    return proposal


def encode_result(result: Result) -> bytes:
    return _proposal_encoder.encode(result)


def decode_result(data: bytes) -> Result:
    try:
        return _result_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidCommand(f"invalid result: {exc}") from None


def validate_var_key(key: str) -> str:
    if not re.match(VAR_KEY_PATTERN, key):
        raise InvalidCommand(
            f"invalid variable key {key!r}: 1-256 characters of letters, digits and _ . : / -",
            field="key",
        )
    return key
