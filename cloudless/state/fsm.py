"""The replicated state machine: applies committed proposals, serves reads,
and snapshots itself.

Pure and deterministic — no clock, no IO — so every replica that applies the
same entries holds the same state. Time comes from `Proposal.now`.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable

import msgspec
import zstandard
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from cloudless.blobs.catalog import Catalog, MemoryKV
from cloudless.blobs.commands import decode_command as decode_blob_command
from cloudless.errors import CloudlessError
from cloudless.pki.bundle import is_endorsed, load_bundle, subject_key_id
from cloudless.pki.errors import InvalidCredentials
from cloudless.state.commands import (
    ActivateNextCA,
    AllocationReport,
    BeginCARotation,
    BlobCatalogCommand,
    BlobResult,
    CasVar,
    CommitPlan,
    ConsumeToken,
    CreateToken,
    Deleted,
    DeleteToken,
    DeleteVar,
    Done,
    Proposal,
    PutVar,
    RecordCertificate,
    RecordClientCertificate,
    RegisterNode,
    Rejected,
    RemoveClient,
    RemoveNode,
    ReportAllocations,
    Result,
    RetireCA,
    RevokeCertificate,
    ScaleWorkload,
    SetGossipKeyring,
    StopWorkload,
    StoreClusterCA,
    SubmitWorkload,
    VarResult,
    decode_proposal,
    decode_result,
    node_may_propose,
)
from cloudless.state.workload import Allocation, WorkloadSpec

SNAPSHOT_MAGIC = b"CLSS"
SNAPSHOT_VERSION = 1
MAX_SESSIONS = 10_000


class CorruptSnapshot(CloudlessError):
    pass


class Var(msgspec.Struct, array_like=True):
    value: str
    create_index: int
    modify_index: int


class TokenState(msgspec.Struct):
    secret_hash: str
    role: str
    expires_at: float
    max_uses: int
    uses: int = 0
    trust: str = ""


class NodeRecord(msgspec.Struct):
    node_id: str
    address: str
    region: str
    zone: str
    labels: dict[str, str]
    registered_index: int
    certificates: dict[str, float]  # serial (hex) -> not_after
    trusted: bool = False  # may coordinate: become a voter, hold the CA key
    # serial (hex) -> the certificate's public key (DER), for gossip's signed claims
    public_keys: dict[str, bytes] = {}


class ClientRecord(msgspec.Struct):
    name: str
    role: str
    created_index: int
    certificates: dict[str, float]  # serial (hex) -> not_after


class ClusterCARecord(msgspec.Struct):
    cluster_id: str
    certificate_pem: bytes
    sealed_key: bytes  # pki.custody: opens only with a trusted node's KEK


class CARotation(msgspec.Struct):
    """A CA rotation under way (`cloudless ca rotate`); `StateMachine.ca` is the active CA.

    phase "trust": `other` is the next CA, trusted but not signing yet.
    phase "reissue": `other` is the previous CA, still trusted while nodes
    and clients re-issue their certificates from the active (new) one.
    """

    phase: str
    other: ClusterCARecord
    active_key_id: str  # hex SubjectKeyIdentifier of `StateMachine.ca`
    other_key_id: str
    started_at: float
    overlap_s: float
    activated_at: float = 0.0
    # identities holding a certificate from the new CA (counted from RegisterNode,
    # RecordCertificate and RecordClientCertificate naming it as issuer)
    reissued_nodes: list[str] = []
    reissued_clients: list[str] = []
    endorsement: bytes = b""  # the previous CA's signature over the new one (pki.bundle.endorse)

    @property
    def activate_at(self) -> float:
        return self.started_at + self.overlap_s / 2

    @property
    def retire_at(self) -> float:
        return self.started_at + self.overlap_s


def ca_key_id(certificate_pem: bytes) -> str:
    """The hex key id of the single CA certificate in `certificate_pem` (InvalidCredentials if it is none)."""
    certificates = load_bundle(certificate_pem)
    if len(certificates) != 1:
        raise InvalidCredentials("expected one CA certificate")
    return subject_key_id(certificates[0]).hex()


class Session(msgspec.Struct, array_like=True):
    seq: int
    result: bytes
    last_index: int


class Change(msgspec.Struct, frozen=True, array_like=True):
    """One key that an applied entry touched, for watches."""

    index: int
    kind: str  # "var", "node", "token", "revocation", "ca"
    key: str


# How many past versions of a workload's spec are kept (for auto-revert).
WORKLOAD_HISTORY = 5


class WorkloadRecord(msgspec.Struct):
    """A workload as the cluster holds it: its current spec and rollout bookkeeping."""

    spec: WorkloadSpec
    created_index: int
    modify_index: int
    submitted_at: float  # when the current version was set (a rollout's start)
    stopped: bool = False
    stable_version: int | None = None  # last version whose rollout completed healthy
    failed_versions: list[int] = []
    history: dict[int, WorkloadSpec] = {}
    explanations: list[str] = []


class AllocationRecord(msgspec.Struct):
    """An allocation plus what the controller needs to decide about it."""

    allocation: Allocation
    created_at: float
    state_since: float
    desired: str = "run"  # run | stop
    health: str = ""  # "", starting, healthy, unhealthy
    message: str = ""
    running_since: float | None = None
    healthy_since: float | None = None  # running, and healthy when it has a check
    replaces: str = ""
    replaced_by: str = ""
    reschedules: int = 0  # replacements before this one in its chain


class _Image(msgspec.Struct):
    applied_index: int
    vars: dict[str, Var]
    tokens: dict[str, TokenState]
    nodes: dict[str, NodeRecord]
    revoked: dict[str, float]
    ca: ClusterCARecord | None
    sessions: list[tuple[str, Session]]
    gossip_keys: list[bytes] = []
    workloads: dict[str, WorkloadRecord] = {}
    allocations: dict[str, AllocationRecord] = {}
    blobs: bytes = b""  # Catalog.export(); empty in images from before blob storage
    clients: dict[str, ClientRecord] = {}
    retired: dict[str, float] = {}
    gossip_rekey: bool = False
    gossip_keys_at: float = 0.0
    ca_rotation: CARotation | None = None


_encoder = msgspec.msgpack.Encoder()
_image_decoder = msgspec.msgpack.Decoder(_Image)


class StateMachine:
    def __init__(self) -> None:
        self.applied_index = 0
        self.vars: dict[str, Var] = {}
        self.tokens: dict[str, TokenState] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.revoked: dict[str, float] = {}  # serial (hex) -> not_after
        self.clients: dict[str, ClientRecord] = {}
        # "node/<name>" or "client/<name>" -> until when the name may not be
        # reused: the removed identity's last certificate expiry. An identity
        # is a name and a key; a new key under the name of a removed one that
        # still holds a valid certificate would let the old holder back in.
        self.retired: dict[str, float] = {}
        self.ca: ClusterCARecord | None = None  # the active CA: the one that signs
        self.ca_rotation: CARotation | None = None
        self.gossip_keys: list[bytes] = []
        # A node was removed since the gossip key last changed: the leader
        # rotates it (coordinator), so a removed node's copy stops working.
        self.gossip_rekey = False
        self.gossip_keys_at = 0.0  # proposer's clock when the keyring last changed
        self.workloads: dict[str, WorkloadRecord] = {}
        self.allocations: dict[str, AllocationRecord] = {}
        self._by_node: dict[str, set[str]] = {}
        self.catalog = Catalog(MemoryKV())  # blob buckets, manifests, uploads, access keys
        # Insertion order is least-recently-used first; eviction is
        # deterministic because every replica applies the same sequence.
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._changes: list[Change] = []

    # -- applying ------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> Result:
        """Apply the Raft entry at `index`; an empty entry is a leader no-op."""
        if index <= self.applied_index:
            raise CloudlessError(f"entry {index} applied twice (applied {self.applied_index})")
        self.applied_index = index
        if not data:
            return Done(index=index)
        try:
            proposal = decode_proposal(data)
        except CloudlessError as exc:
            # A replica must not diverge on bad input: reject it the same way everywhere.
            return Rejected(kind="invalid", message=exc.message)
        if proposal.client_id:
            session = self._sessions.get(proposal.client_id)
            if session is not None and proposal.seq <= session.seq:
                if proposal.seq == session.seq:
                    return decode_result(session.result)
                return Rejected(
                    kind="invalid", message=f"stale sequence {proposal.seq} for session {proposal.client_id}"
                )
        result = self._apply_command(index, proposal)
        if proposal.client_id:
            self._sessions[proposal.client_id] = Session(proposal.seq, _encoder.encode(result), index)
            self._sessions.move_to_end(proposal.client_id)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return result

    def _apply_command(self, index: int, proposal: Proposal) -> Result:
        cmd = proposal.command
        now = proposal.now
        if proposal.proposer:
            # Checked at the leader too; again here so that no path into the
            # log (a bug, an old leader) can apply a node's overreach.
            refusal = node_may_propose(cmd, proposal.proposer)
            if refusal is not None:
                return Rejected(kind="permission_denied", message=refusal)
        if isinstance(cmd, PutVar):
            return self._write_var(index, cmd.key, cmd.value)
        if isinstance(cmd, CasVar):
            current = self.vars.get(cmd.key)
            current_index = current.modify_index if current else 0
            if current_index != cmd.expected_index:
                return Rejected(
                    kind="conflict",
                    message=f"{cmd.key}: modify index is {current_index}, not {cmd.expected_index}",
                    current_index=current_index,
                )
            return self._write_var(index, cmd.key, cmd.value)
        if isinstance(cmd, DeleteVar):
            current = self.vars.get(cmd.key)
            if current is None:
                return Rejected(kind="not_found", message=f"{cmd.key}: no such variable")
            if cmd.expected_index is not None and current.modify_index != cmd.expected_index:
                return Rejected(
                    kind="conflict",
                    message=f"{cmd.key}: modify index is {current.modify_index}, not {cmd.expected_index}",
                    current_index=current.modify_index,
                )
            del self.vars[cmd.key]
            self._changes.append(Change(index, "var", cmd.key))
            return Deleted(key=cmd.key, index=index)
        if isinstance(cmd, CreateToken):
            if cmd.token_id in self.tokens:
                return Rejected(kind="conflict", message=f"token {cmd.token_id} exists")
            self.tokens[cmd.token_id] = TokenState(
                cmd.secret_hash, cmd.role, cmd.expires_at, cmd.max_uses, trust=cmd.trust
            )
            self._expire_tokens(now)
            self._changes.append(Change(index, "token", cmd.token_id))
            return Done(index=index)
        if isinstance(cmd, DeleteToken):
            if self.tokens.pop(cmd.token_id, None) is None:
                return Rejected(kind="not_found", message=f"no token {cmd.token_id}")
            self._changes.append(Change(index, "token", cmd.token_id))
            return Done(index=index)
        if isinstance(cmd, RecordClientCertificate):
            if self.retired.get(f"client/{cmd.name}", 0.0) > now:
                return Rejected(kind="conflict", message=f"client name {cmd.name} was removed and is not reusable yet")
            client = self.clients.get(cmd.name)
            if client is None:
                client = self.clients[cmd.name] = ClientRecord(cmd.name, cmd.role, index, {})
            elif client.role != cmd.role:
                return Rejected(
                    kind="conflict", message=f"client {cmd.name} exists with role {client.role}; remove it first"
                )
            client.certificates[cmd.serial] = cmd.not_after
            self._count_reissued(cmd.issuer, client=cmd.name)
            for serial in [s for s, na in client.certificates.items() if na <= now]:
                del client.certificates[serial]
            self._changes.append(Change(index, "client", cmd.name))
            return Done(index=index)
        if isinstance(cmd, RemoveClient):
            client = self.clients.pop(cmd.name, None)
            if client is None:
                return Rejected(kind="not_found", message=f"no client {cmd.name}")
            self._retire(f"client/{cmd.name}", client.certificates, now)
            self._changes.append(Change(index, "client", cmd.name))
            self._changes.append(Change(index, "revocation", cmd.name))
            return Done(index=index)
        if isinstance(cmd, ConsumeToken):
            token = self.tokens.get(cmd.token_id)
            if token is None:
                return Rejected(kind="not_found", message="unknown token")
            if token.expires_at <= now:
                return Rejected(kind="invalid", message="token expired")
            if token.uses >= token.max_uses:
                return Rejected(kind="invalid", message="token used up")
            if token.role != cmd.role:
                return Rejected(kind="invalid", message=f"token is for role {token.role}, not {cmd.role}")
            token.uses += 1
            self._changes.append(Change(index, "token", cmd.token_id))
            return Done(index=index)
        if isinstance(cmd, RegisterNode):
            if cmd.public_key and not _is_p256_key(cmd.public_key):
                return Rejected(kind="invalid", message="public_key is not a P-256 public key")
            record = self.nodes.get(cmd.node_id)
            if record is None and self.retired.get(f"node/{cmd.node_id}", 0.0) > now:
                return Rejected(kind="conflict", message=f"node name {cmd.node_id} was removed and is not reusable yet")
            if record is None:
                record = NodeRecord(
                    cmd.node_id, cmd.address, cmd.region, cmd.zone, dict(cmd.labels), index, {}, cmd.trusted
                )
                self.nodes[cmd.node_id] = record
            else:
                record.address, record.region, record.zone = cmd.address, cmd.region, cmd.zone
                record.labels = dict(cmd.labels)
            record.certificates[cmd.certificate_serial] = cmd.certificate_not_after
            self._count_reissued(cmd.issuer, node=cmd.node_id)
            if cmd.public_key:
                record.public_keys[cmd.certificate_serial] = cmd.public_key
            self._prune_certificates(record, now)
            self._changes.append(Change(index, "node", cmd.node_id))
            return Done(index=index)
        if isinstance(cmd, RecordCertificate):
            record = self.nodes.get(cmd.node_id)
            if record is None:
                return Rejected(kind="not_found", message=f"no node {cmd.node_id}")
            if cmd.public_key and not _is_p256_key(cmd.public_key):
                return Rejected(kind="invalid", message="public_key is not a P-256 public key")
            record.certificates[cmd.serial] = cmd.not_after
            if cmd.public_key:
                record.public_keys[cmd.serial] = cmd.public_key
            self._count_reissued(cmd.issuer, node=cmd.node_id)
            self._prune_certificates(record, now)
            self._changes.append(Change(index, "node", cmd.node_id))
            return Done(index=index)
        if isinstance(cmd, RemoveNode):
            record = self.nodes.pop(cmd.node_id, None)
            if record is None:
                return Rejected(kind="not_found", message=f"no node {cmd.node_id}")
            self._retire(f"node/{cmd.node_id}", record.certificates, now)
            if self.gossip_keys:
                self.gossip_rekey = True
            self._changes.append(Change(index, "node", cmd.node_id))
            self._changes.append(Change(index, "revocation", cmd.node_id))
            return Done(index=index)
        if isinstance(cmd, RevokeCertificate):
            self.revoked[cmd.serial] = cmd.not_after
            self._prune_revocations(now)
            self._changes.append(Change(index, "revocation", cmd.serial))
            return Done(index=index)
        if isinstance(cmd, StoreClusterCA):
            if self.ca is not None and (
                self.ca.cluster_id != cmd.cluster_id or self.ca.certificate_pem != cmd.certificate_pem
            ):
                return Rejected(kind="conflict", message="the cluster already has a CA (`ca rotate` replaces it)")
            self.ca = ClusterCARecord(cmd.cluster_id, cmd.certificate_pem, cmd.sealed_key)
            self._changes.append(Change(index, "ca", cmd.cluster_id))
            return Done(index=index)
        if isinstance(cmd, (BeginCARotation, ActivateNextCA, RetireCA)):
            return self._apply_ca_rotation(cmd, index, now)
        if isinstance(cmd, SetGossipKeyring):
            if cmd.keys[0] not in self.gossip_keys:
                self.gossip_rekey = False  # a new primary: whoever was removed does not hold it
            if list(cmd.keys) != self.gossip_keys:
                self.gossip_keys_at = now
            self.gossip_keys = list(cmd.keys)
            self._changes.append(Change(index, "gossip_keys", ""))
            return Done(index=index)
        if isinstance(cmd, (SubmitWorkload, ScaleWorkload, StopWorkload, ReportAllocations, CommitPlan)):
            return self._apply_workload_command(index, cmd, now)
        if isinstance(cmd, BlobCatalogCommand):
            return self._apply_blob_command(index, cmd)
        return Rejected(kind="invalid", message=f"unknown command {type(cmd).__name__}")

    def _apply_blob_command(self, index: int, cmd: BlobCatalogCommand) -> Result:
        # A failed precondition (no such bucket, version mismatch...) changes nothing and
        # comes back as Rejected with the blob error's own code, so the caller can re-raise it.
        try:
            value = self.catalog.apply(decode_blob_command(cmd.command))
        except CloudlessError as exc:
            return Rejected(kind=exc.code, message=exc.message)
        return BlobResult(index=index, value=_encoder.encode(value))

    # -- workloads and allocations ---------------------------------------------

    def _apply_workload_command(
        self,
        index: int,
        cmd: SubmitWorkload | ScaleWorkload | StopWorkload | ReportAllocations | CommitPlan,
        now: float,
    ) -> Result:
        if isinstance(cmd, SubmitWorkload):
            record = self.workloads.get(cmd.spec.name)
            if record is None:
                spec = msgspec.structs.replace(cmd.spec, version=1)
                self.workloads[spec.name] = WorkloadRecord(spec, index, index, now, history={1: spec})
            else:
                same = msgspec.structs.replace(cmd.spec, version=record.spec.version) == record.spec
                if same and not record.stopped:
                    return Done(index=record.modify_index)
                spec = msgspec.structs.replace(cmd.spec, version=record.spec.version + 1)
                self._set_version(record, spec, index, now)
                record.stopped = False
            self._changes.append(Change(index, "workload", spec.name))
            return Done(index=index)
        if isinstance(cmd, ScaleWorkload):
            record = self.workloads.get(cmd.name)
            if record is None:
                return Rejected(kind="not_found", message=f"no workload {cmd.name}")
            record.spec = msgspec.structs.replace(record.spec, replicas=cmd.replicas)
            record.history[record.spec.version] = record.spec
            record.modify_index = index
            record.stopped = False
            self._changes.append(Change(index, "workload", cmd.name))
            return Done(index=index)
        if isinstance(cmd, StopWorkload):
            record = self.workloads.get(cmd.name)
            if record is None:
                return Rejected(kind="not_found", message=f"no workload {cmd.name}")
            record.stopped = True
            record.modify_index = index
            for alloc_id in [a for a, r in self.allocations.items() if r.allocation.workload == cmd.name]:
                self._desire_stop(index, alloc_id)
            self._changes.append(Change(index, "workload", cmd.name))
            return Done(index=index)
        if isinstance(cmd, ReportAllocations):
            for report in cmd.reports:
                rec = self.allocations.get(report.id)
                if rec is None or rec.allocation.node != cmd.node:
                    continue
                self._record_report(index, rec, report, now)
            return Done(index=index)
        assert isinstance(cmd, CommitPlan)
        for allocation in cmd.create:
            if allocation.id in self.allocations or allocation.workload not in self.workloads:
                continue
            replaces = cmd.replaces.get(allocation.id, "")
            previous = self.allocations.get(replaces) if replaces else None
            rec = AllocationRecord(allocation, now, now, replaces=replaces)
            if previous is not None:
                previous.replaced_by = allocation.id
                rec.reschedules = previous.reschedules + 1
            self.allocations[allocation.id] = rec
            self._by_node.setdefault(allocation.node, set()).add(allocation.id)
            self._changes.append(Change(index, "allocation", allocation.node))
        for alloc_id in cmd.stop:
            self._desire_stop(index, alloc_id)
        for alloc_id in cmd.lost:
            rec = self.allocations.get(alloc_id)
            if rec is not None and rec.allocation.live:
                rec.allocation = msgspec.structs.replace(rec.allocation, state="lost")
                rec.state_since = now
                self._changes.append(Change(index, "allocation", rec.allocation.node))
        for alloc_id in cmd.forget:
            rec = self.allocations.pop(alloc_id, None)
            if rec is not None:
                self._by_node.get(rec.allocation.node, set()).discard(alloc_id)
                self._changes.append(Change(index, "allocation", rec.allocation.node))
        for name, lines in cmd.explanations.items():
            if name in self.workloads:
                self.workloads[name].explanations = list(lines)
        for name, version in cmd.stable.items():
            record = self.workloads.get(name)
            if record is not None and version in record.history:
                record.stable_version = version
        for name, failed in cmd.failed.items():
            record = self.workloads.get(name)
            if record is not None and failed not in record.failed_versions:
                record.failed_versions.append(failed)
                self._changes.append(Change(index, "workload", name))
        for name, failed in cmd.revert.items():
            record = self.workloads.get(name)
            if record is None or record.spec.version != failed:
                continue
            if failed not in record.failed_versions:
                record.failed_versions.append(failed)
            stable = record.history.get(record.stable_version) if record.stable_version is not None else None
            if stable is not None:
                self._set_version(record, msgspec.structs.replace(stable, version=failed + 1), index, now)
            self._changes.append(Change(index, "workload", name))
        return Done(index=index)

    def _set_version(self, record: WorkloadRecord, spec: WorkloadSpec, index: int, now: float) -> None:
        record.spec = spec
        record.modify_index = index
        record.submitted_at = now
        record.history[spec.version] = spec
        keep = sorted(record.history)[-WORKLOAD_HISTORY:]
        if record.stable_version is not None and record.stable_version not in keep:
            keep.append(record.stable_version)
        record.history = {v: record.history[v] for v in sorted(keep)}

    def _desire_stop(self, index: int, alloc_id: str) -> None:
        rec = self.allocations.get(alloc_id)
        if rec is None or rec.desired == "stop":
            return
        rec.desired = "stop"
        self._changes.append(Change(index, "allocation", rec.allocation.node))

    def _record_report(self, index: int, rec: AllocationRecord, report: AllocationReport, now: float) -> None:
        before = rec.allocation
        if report.state == "pending" and not before.live:
            return  # an agent that just (re)started knows less than the state does
        if (
            before.state == "lost"
            and report.state not in ("exited", "failed")
            and (rec.replaced_by or rec.desired == "stop")
        ):
            # Replaced while its node was away: it only comes back to be stopped.
            state: str = before.state
        else:
            state = report.state
        after = msgspec.structs.replace(before, state=state, exit_code=report.exit_code, restarts=report.restarts)
        if state != before.state:
            rec.state_since = now
        if state == "running":
            if rec.running_since is None:
                rec.running_since = now
        else:
            rec.running_since = None
        workload = self.workloads.get(before.workload)
        spec = workload.history.get(before.version, workload.spec) if workload is not None else None
        checked = spec is not None and spec.health_check is not None
        # With a health check only a passing check counts, never "not probed yet".
        healthy = state == "running" and (report.health == "healthy" if checked else report.health in ("", "healthy"))
        if not healthy:
            rec.healthy_since = None
        elif rec.healthy_since is None:
            rec.healthy_since = now
        changed = after != before or rec.health != report.health or rec.message != report.message
        rec.allocation, rec.health, rec.message = after, report.health, report.message
        if changed:
            self._changes.append(Change(index, "allocation_status", before.node))

    def allocations_of_node(self, node_id: str) -> list[AllocationRecord]:
        return [self.allocations[a] for a in sorted(self._by_node.get(node_id, ()))]

    def allocations_of_workload(self, name: str) -> list[AllocationRecord]:
        return sorted(
            (r for r in self.allocations.values() if r.allocation.workload == name),
            key=lambda r: (r.allocation.replica, r.created_at, r.allocation.id),
        )

    def _write_var(self, index: int, key: str, value: str) -> VarResult:
        current = self.vars.get(key)
        self.vars[key] = Var(value, current.create_index if current else index, index)
        self._changes.append(Change(index, "var", key))
        return VarResult(key=key, value=value, index=index)

    def _expire_tokens(self, now: float) -> None:
        for token_id in [t for t, s in self.tokens.items() if s.expires_at <= now]:
            del self.tokens[token_id]

    @staticmethod
    def _prune_certificates(record: NodeRecord, now: float) -> None:
        for serial in [s for s, na in record.certificates.items() if na <= now]:
            del record.certificates[serial]
        for serial in [s for s in record.public_keys if s not in record.certificates]:
            del record.public_keys[serial]

    def trust_bundle(self) -> bytes:
        """The CA certificates every node and client trusts, active first (b"": no CA yet)."""
        if self.ca is None:
            return b""
        other = self.ca_rotation.other.certificate_pem if self.ca_rotation is not None else b""
        return self.ca.certificate_pem + other

    def trust_endorsement(self) -> bytes:
        """The endorsement of the newer CA in `trust_bundle()` (b"" outside a rotation)."""
        return self.ca_rotation.endorsement if self.ca_rotation is not None else b""

    def _count_reissued(self, issuer: str, *, node: str = "", client: str = "") -> None:
        rotation = self.ca_rotation
        if rotation is None or rotation.phase != "reissue" or issuer != rotation.active_key_id:
            return
        if node and node not in rotation.reissued_nodes:
            rotation.reissued_nodes.append(node)
        if client and client not in rotation.reissued_clients:
            rotation.reissued_clients.append(client)

    def ca_retire_blockers(self, now: float) -> list[str]:
        """Why the previous CA cannot be retired yet ([]: it can)."""
        rotation = self.ca_rotation
        if rotation is None or rotation.phase != "reissue":
            return ["no CA rotation is re-issuing"]
        why = []
        if now < rotation.retire_at:
            why.append(f"the overlap lasts until {rotation.retire_at:.0f}")
        old = sorted(n for n in self.nodes if n not in rotation.reissued_nodes)
        if old:
            why.append("nodes still on the previous CA: " + ", ".join(old))
        return why

    def _apply_ca_rotation(self, cmd: BeginCARotation | ActivateNextCA | RetireCA, index: int, now: float) -> Result:
        rotation = self.ca_rotation
        if isinstance(cmd, BeginCARotation):
            if self.ca is None:
                return Rejected(kind="invalid", message="the cluster has no CA yet")
            if cmd.cluster_id != self.ca.cluster_id:
                return Rejected(kind="invalid", message=f"the new CA is for cluster {cmd.cluster_id}")
            if rotation is not None:
                return Rejected(kind="conflict", message=f"a CA rotation is already under way ({rotation.phase})")
            try:
                active_key_id, next_key_id = ca_key_id(self.ca.certificate_pem), ca_key_id(cmd.certificate_pem)
            except InvalidCredentials as exc:
                return Rejected(kind="invalid", message=f"the new CA: {exc.message}")
            if next_key_id == active_key_id:
                return Rejected(kind="invalid", message="the new CA has the active CA's key")
            active, new = load_bundle(self.ca.certificate_pem)[0], load_bundle(cmd.certificate_pem)[0]
            if not is_endorsed(active, cmd.cluster_id, new, cmd.endorsement):
                return Rejected(kind="invalid", message="the new CA is not endorsed by the active CA's key")
            self.ca_rotation = CARotation(
                "trust",
                ClusterCARecord(cmd.cluster_id, cmd.certificate_pem, cmd.sealed_key),
                active_key_id,
                next_key_id,
                now,
                cmd.overlap_s,
                endorsement=cmd.endorsement,
            )
        elif isinstance(cmd, ActivateNextCA):
            if rotation is None or rotation.phase != "trust" or cmd.key_id != rotation.other_key_id:
                return Rejected(kind="conflict", message=f"CA {cmd.key_id} is not the next CA")
            if now < rotation.activate_at:
                return Rejected(kind="conflict", message="the next CA is trusted for half the overlap first")
            self.ca, rotation.other = rotation.other, self.ca
            rotation.active_key_id, rotation.other_key_id = rotation.other_key_id, rotation.active_key_id
            rotation.phase, rotation.activated_at = "reissue", now
        else:
            if rotation is None or rotation.phase != "reissue" or cmd.key_id != rotation.other_key_id:
                return Rejected(kind="conflict", message=f"CA {cmd.key_id} is not the previous CA")
            blockers = self.ca_retire_blockers(now)
            if blockers:
                return Rejected(kind="conflict", message="; ".join(blockers))
            self.ca_rotation = None
        self._changes.append(Change(index, "ca", self.ca.cluster_id if self.ca else ""))
        return Done(index=index)

    def _retire(self, identity: str, certificates: dict[str, float], now: float) -> None:
        """Revoke an identity's live certificates and keep its name unusable until the last one expires."""
        for serial, not_after in certificates.items():
            if not_after > now:
                self.revoked[serial] = not_after
        until = max((na for na in certificates.values() if na > now), default=0.0)
        if until > self.retired.get(identity, 0.0):
            self.retired[identity] = until
        for name in [n for n, t in self.retired.items() if t <= now]:
            del self.retired[name]
        self._prune_revocations(now)

    def _prune_revocations(self, now: float) -> None:
        # An expired certificate is refused anyway; keep the list short.
        for serial in [s for s, na in self.revoked.items() if na <= now]:
            del self.revoked[serial]

    # -- reads ---------------------------------------------------------------

    def get_var(self, key: str) -> Var | None:
        return self.vars.get(key)

    def list_vars(self, prefix: str = "") -> list[tuple[str, Var]]:
        return sorted((k, v) for k, v in self.vars.items() if k.startswith(prefix))

    def node_public_keys(self, node_id: str) -> list[bytes] | None:
        """DER public keys of a node's live, unrevoked certificates, for
        gossip's signed claims: None if the name was never registered here,
        [] if it was removed (nothing it says verifies)."""
        record = self.nodes.get(node_id)
        if record is None:
            return [] if f"node/{node_id}" in self.retired else None
        if not record.public_keys:
            return None  # registered before keys were recorded: its renewal records one
        return [k for serial, k in record.public_keys.items() if serial not in self.revoked]

    def take_changes(self) -> list[Change]:
        changes, self._changes = self._changes, []
        return changes

    # -- snapshots -----------------------------------------------------------

    def snapshot(self) -> bytes:
        """Versioned, checksummed, zstd-compressed image of the whole state."""
        image = _Image(
            applied_index=self.applied_index,
            vars=self.vars,
            tokens=self.tokens,
            nodes=self.nodes,
            revoked=self.revoked,
            ca=self.ca,
            sessions=list(self._sessions.items()),
            gossip_keys=self.gossip_keys,
            workloads=self.workloads,
            allocations=self.allocations,
            blobs=self.catalog.export(),
            clients=self.clients,
            retired=self.retired,
            gossip_rekey=self.gossip_rekey,
            gossip_keys_at=self.gossip_keys_at,
            ca_rotation=self.ca_rotation,
        )
        body = zstandard.ZstdCompressor(level=3).compress(_encoder.encode(image))
        header = SNAPSHOT_MAGIC + SNAPSHOT_VERSION.to_bytes(2, "big") + zlib.crc32(body).to_bytes(4, "big")
        return header + body

    def restore(self, data: bytes) -> None:
        if len(data) < 10 or data[:4] != SNAPSHOT_MAGIC:
            raise CorruptSnapshot("not a state snapshot")
        version = int.from_bytes(data[4:6], "big")
        if version != SNAPSHOT_VERSION:
            raise CorruptSnapshot(f"unsupported state snapshot version {version}")
        body = data[10:]
        if zlib.crc32(body) != int.from_bytes(data[6:10], "big"):
            raise CorruptSnapshot("state snapshot checksum mismatch")
        try:
            image = _image_decoder.decode(zstandard.ZstdDecompressor().decompress(body))
        except (msgspec.DecodeError, zstandard.ZstdError) as exc:
            raise CorruptSnapshot(f"state snapshot does not decode: {exc}") from None
        self.applied_index = image.applied_index
        self.vars = image.vars
        self.tokens = image.tokens
        self.nodes = image.nodes
        self.revoked = image.revoked
        self.clients = dict(image.clients)
        self.retired = dict(image.retired)
        self.ca = image.ca
        self.ca_rotation = image.ca_rotation
        self._sessions = OrderedDict(image.sessions)
        self.gossip_keys = list(image.gossip_keys)
        self.gossip_rekey = image.gossip_rekey
        self.gossip_keys_at = image.gossip_keys_at
        self.workloads = dict(image.workloads)
        self.allocations = dict(image.allocations)
        self._by_node = {}
        for alloc_id, rec in self.allocations.items():
            self._by_node.setdefault(rec.allocation.node, set()).add(alloc_id)
        self.catalog = Catalog.restore(image.blobs) if image.blobs else Catalog(MemoryKV())
        self._changes = []


def _is_p256_key(der: bytes) -> bool:
    try:
        key = load_der_public_key(der)
    except ValueError:
        return False
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def apply_all(fsm: StateMachine, entries: Iterable[tuple[int, bytes]]) -> list[Result]:
    return [fsm.apply(index, data) for index, data in entries]
