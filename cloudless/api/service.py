"""The client-facing API every node serves (the CLI's other end).

Writes go through Raft (forwarded to the leader by `ReplicatedState`);
reads are linearizable by default (ReadIndex) and may opt into stale local
reads. Calls that need the leader's view — cluster status, tokens, node
removal, events — run on the leader: a follower forwards them once, to
`fwd.<method>`, which never forwards again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import trio
from cryptography import x509

from cloudless.api.messages import (
    Deleted,
    EventsFollow,
    MemberInfo,
    NodeRemove,
    StatusReply,
    StatusRequest,
    TokenCreate,
    TokenReply,
    VarItems,
    VarsCas,
    VarsGet,
    VarsList,
    VarsPut,
    VarsRm,
    VarValue,
)
from cloudless.api.routing import LeaderRouting, PermissionDenied
from cloudless.errors import CloudlessError, Conflict, InvalidInput, NotFound, Unavailable
from cloudless.gossip.members import ALIVE, DEAD, LEFT, SUSPECT
from cloudless.gossip.metadata import RUNTIME_LABEL
from cloudless.observability.events import EventLog
from cloudless.pki.ca import certificate_fingerprint
from cloudless.pki.tokens import create_token
from cloudless.ports import ClusterView, Proposer
from cloudless.raft.messages import ConfChange, ConfChangeType
from cloudless.state.commands import (
    CasVar,
    CreateToken,
    DeleteVar,
    PutVar,
    Rejected,
    RemoveNode,
    Result,
    VarResult,
)
from cloudless.state.commands import Deleted as DeletedResult
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

log = logging.getLogger(__name__)

_STATE_NAMES: dict[int, str] = {ALIVE: "alive", SUSPECT: "suspect", DEAD: "dead", LEFT: "left"}


def raise_rejected(result: Result) -> None:
    if isinstance(result, Rejected):
        error = {
            "conflict": Conflict,
            "not_found": NotFound,
            "invalid": InvalidInput,
            "permission_denied": PermissionDenied,
        }.get(result.kind, CloudlessError)
        raise error(result.message, current_index=result.current_index)


class ApiService:
    def __init__(self, cluster: ClusterView, replicated: Proposer, rpc: RpcClient, events: EventLog) -> None:
        self.cluster = cluster
        self.replicated = replicated
        self.rpc = rpc
        self.event_log = events

    def register(self, server: RpcServer) -> None:
        routing = LeaderRouting(self.cluster, self.replicated, self.rpc)
        routing.register_on_member(server, "vars.get", self.vars_get, VarsGet)
        routing.register_on_member(server, "vars.ls", self.vars_ls, VarsList)
        # Writes run on the leader, which authorizes the caller itself (a
        # follower passes the call on with the caller's proof): a node may
        # not propose variables (state.commands.node_may_propose).
        routing.register_on_leader(server, "vars.put", self.vars_put, VarsPut)
        routing.register_on_leader(server, "vars.cas", self.vars_cas, VarsCas)
        routing.register_on_leader(server, "vars.rm", self.vars_rm, VarsRm)
        routing.register_on_leader(server, "status", self.status, StatusRequest)
        routing.register_on_leader(server, "nodes.list", self.status, StatusRequest)
        routing.register_on_leader(server, "token.create", self.token_create, TokenCreate)
        routing.register_on_leader(server, "nodes.rm", self.nodes_rm, NodeRemove)
        server.stream("events", request=EventsFollow)(self.events)

    # -- variables -----------------------------------------------------------------

    async def vars_get(self, ctx: RpcContext, req: VarsGet) -> VarValue:
        if not req.stale:
            await self.replicated.linearizable()
        var = self.replicated.fsm.get_var(req.key)
        if var is None:
            raise NotFound(f"no variable {req.key}", key=req.key)
        return VarValue(req.key, var.value, var.modify_index)

    async def vars_ls(self, ctx: RpcContext, req: VarsList) -> VarItems:
        if not req.stale:
            await self.replicated.linearizable()
        fsm = self.replicated.fsm
        items = [VarValue(k, v.value, v.modify_index) for k, v in fsm.list_vars(req.prefix)]
        return VarItems(items, fsm.applied_index)

    async def vars_put(self, ctx: RpcContext, req: VarsPut) -> VarValue:
        return await self._write(PutVar(req.key, req.value), req.client_id, req.seq)

    async def vars_cas(self, ctx: RpcContext, req: VarsCas) -> VarValue:
        return await self._write(CasVar(req.key, req.value, req.index), req.client_id, req.seq)

    async def vars_rm(self, ctx: RpcContext, req: VarsRm) -> Deleted:
        result, _ = await self.replicated.propose(DeleteVar(req.key, req.index), client_id=req.client_id, seq=req.seq)
        raise_rejected(result)
        assert isinstance(result, DeletedResult)
        return Deleted(result.key, result.index)

    async def _write(self, command, client_id: str, seq: int) -> VarValue:
        result, _ = await self.replicated.propose(command, client_id=client_id, seq=seq)
        raise_rejected(result)
        assert isinstance(result, VarResult), result
        return VarValue(result.key, result.value, result.index)

    # -- cluster ----------------------------------------------------------------

    async def status(self, ctx: RpcContext, req: StatusRequest) -> StatusReply:
        cluster = self.cluster
        replicated = self.replicated
        conf = replicated.core.conf_state
        members: list[MemberInfo] = []
        fsm_nodes = replicated.fsm.nodes
        names = set(fsm_nodes) | cluster.member_names()
        for name in sorted(names):
            member = cluster.member(name)
            record = fsm_nodes.get(name)
            meta = member.meta if member is not None else None
            if name == cluster.node_id:
                state = "alive"
                meta = cluster.metadata()
            else:
                state = _STATE_NAMES.get(member.state, "unknown") if member is not None else "unknown"
            role = "voter" if name in conf.voters else "learner" if name in conf.learners else "none"
            members.append(
                MemberInfo(
                    id=name,
                    name=name,
                    address=record.address if record else (member.addr if member else ""),
                    state=state,
                    role=role,
                    region=(record.region if record else "") or (meta.region if meta else ""),
                    zone=(record.zone if record else "") or (meta.zone if meta else ""),
                    power=meta.power if meta else "ac",
                    battery_pct=float(meta.battery_percent) if meta and meta.battery_percent is not None else None,
                    network=("metered" if meta.metered else meta.network) if meta else "wired",
                    runtime=meta.labels.get(RUNTIME_LABEL, "") if meta else "",
                )
            )
        return StatusReply(
            cluster_id=cluster.cluster_id,
            leader=replicated.leader or "",
            term=replicated.core.term,
            commit_index=replicated.core.commit_index,
            voters=sorted(conf.voters),
            learners=sorted(conf.learners),
            members=members,
            node=cluster.node_id,
        )

    async def token_create(self, ctx: RpcContext, req: TokenCreate) -> TokenReply:
        if ctx.peer.kind == "node":
            pass  # forwarded by a node on behalf of its (already checked) client
        elif ctx.peer.kind != "client":
            raise PermissionDenied("only admin clients create tokens")
        replicated = self.replicated
        # Right after bootstrap the new leader is still committing the CA.
        with trio.move_on_after(min(5.0, ctx.time_left)):
            while replicated.fsm.ca is None:
                await replicated.wait_changed()
        ca_record = replicated.fsm.ca
        if ca_record is None:
            raise Unavailable("the cluster CA is not committed yet; retry shortly")
        fingerprint = certificate_fingerprint(x509.load_pem_x509_certificate(ca_record.certificate_pem))
        if req.trust and req.role != "node":
            raise InvalidInput("--trust applies to node tokens only", field="trust")
        now = datetime.now(UTC)
        text, record = create_token(fingerprint, req.role, timedelta(seconds=req.ttl_s), req.uses, now)  # type: ignore[arg-type]
        result, _ = await replicated.propose(
            CreateToken(
                token_id=record.id,
                secret_hash=record.secret_hash.hex(),
                role=record.role,
                expires_at=record.expires_at.timestamp(),
                max_uses=record.max_uses,
                trust=req.trust,
            )
        )
        raise_rejected(result)
        self.event_log.record(
            "token.created", self.cluster.node_id, f"{req.role} token {record.id} for {req.uses} use(s)"
        )
        return TokenReply(text, record.id, record.role, record.expires_at.timestamp(), record.max_uses)

    async def nodes_rm(self, ctx: RpcContext, req: NodeRemove) -> StatusReply:
        if ctx.peer.kind not in ("client", "node"):
            raise PermissionDenied("only admin clients remove nodes")
        replicated = self.replicated
        if req.node_id == self.cluster.node_id:
            raise Conflict("the leader cannot remove itself; stop it and remove it from another node")
        if req.node_id not in replicated.fsm.nodes:
            raise NotFound(f"no node {req.node_id}")
        conf = replicated.core.conf_state
        if req.node_id in conf.voters or req.node_id in conf.learners:
            await replicated.propose_conf_change(ConfChange(int(ConfChangeType.REMOVE_NODE), req.node_id))
        result, _ = await replicated.propose(RemoveNode(req.node_id))
        raise_rejected(result)
        self.event_log.record("node.removed", req.node_id, "removed by an admin; its certificates are revoked")
        return await self.status(ctx, StatusRequest())

    async def events(self, ctx: RpcContext, req: EventsFollow) -> None:
        log_ = self.event_log
        history = log_.last(req.last)
        for event in history:
            await ctx.send(event)
        if not req.follow:
            return
        after = history[-1].seq if history else (log_.last(1)[0].seq if log_.last(1) else 0)
        async for event in log_.follow(after):
            await ctx.send(event)
