"""The workload API: run/apply, ps, inspect, scale, update, stop, logs, exec —
plus the agent's side (`allocations.watch`, `allocations.report`) and the
node-local relay ends (`agent.logs`, `agent.exec`).

Client calls run on the Raft leader (it has the state and gossip's view for
admission); a follower forwards them once to `fwd.<method>`. Logs and exec
are relayed: client → any node → leader → the node that runs the replica, so
they work for nodes only the cluster can reach (behind NAT, the replica's
node holds an outgoing connection the relay reuses).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import msgspec
import trio

from cloudless.agent.messages import (
    HEARTBEAT_S,
    AssignedAllocation,
    ExecEvent,
    ExecExit,
    ExecInput,
    ExecOutput,
    ExecRequest,
    ExecResize,
    ExecStdin,
    ExecStdinClose,
    LogLine,
    LogsRequest,
    NodeAllocations,
    ReportAck,
    ReportBatch,
    TerminalSize,
    WatchAllocations,
)
from cloudless.api.routing import LeaderRouting, PermissionDenied
from cloudless.api.service import raise_rejected
from cloudless.coordinator.controller import ControllerState, admission_error
from cloudless.coordinator.preview import Preview, preview
from cloudless.errors import CloudlessError, Conflict, NotFound, Unavailable
from cloudless.observability.events import EventLog
from cloudless.ports import ClusterView, Proposer
from cloudless.raft.core import NotLeader
from cloudless.raft.errors import NoLeader
from cloudless.sandbox.runtime import ExecTimeout
from cloudless.scheduler import NodeInfo
from cloudless.scheduler.plan import pending_reason
from cloudless.state.commands import ReportAllocations, ScaleWorkload, StopWorkload, SubmitWorkload
from cloudless.state.fsm import AllocationRecord, StateMachine, WorkloadRecord
from cloudless.state.workload import WorkloadName, WorkloadSpec, validate
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

if TYPE_CHECKING:
    from cloudless.agent.agent import Agent

log = logging.getLogger(__name__)

ClientId = Annotated[str, msgspec.Meta(max_length=128)]


class Unschedulable(CloudlessError):
    """Admission: no node of the cluster could ever run one replica."""

    code = "unschedulable"


# ---------------------------------------------------------------- vocabulary


class RunWorkload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    spec: WorkloadSpec
    replace: bool = False  # apply: create or update; run: create only
    client_id: ClientId = ""
    seq: int = 0


class DryRun(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`apply --dry-run` / `run --dry-run`: what RunWorkload would do now; changes nothing."""

    spec: WorkloadSpec
    replace: bool = False  # as RunWorkload: apply may update, run only creates


class WorkloadRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: WorkloadName
    client_id: ClientId = ""
    seq: int = 0


class ScaleRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: WorkloadName
    replicas: Annotated[int, msgspec.Meta(ge=0, le=100_000)]
    client_id: ClientId = ""
    seq: int = 0


class UpdateRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: WorkloadName
    image: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None
    client_id: ClientId = ""
    seq: int = 0


class WorkloadReply(msgspec.Struct, frozen=True):
    name: str
    version: int
    index: int


class PsRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class PsItem(msgspec.Struct, frozen=True):
    name: str
    image: str
    desired: int
    running: int
    state: str  # running | pending | degraded | deploying | failed | stopped
    version: int
    pending_reason: str = ""  # why replicas are not placed ("" when none wait for a node)


class PsReply(msgspec.Struct, frozen=True):
    items: list[PsItem]


class AllocationInfo(msgspec.Struct, frozen=True):
    id: str
    node: str
    replica: int
    version: int
    state: str
    desired: str
    exit_code: int | None
    restarts: int
    health: str
    message: str


class InspectReply(msgspec.Struct, frozen=True):
    name: str
    spec: WorkloadSpec
    state: str
    stopped: bool
    stable_version: int | None
    failed_versions: list[int]
    allocations: list[AllocationInfo]
    explanations: list[str]
    pending_reason: str = ""  # why replicas are not placed ("" when none wait for a node)


class WorkloadLogs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: WorkloadName
    replica: Annotated[int, msgspec.Meta(ge=0)] | None = None
    follow: bool = False
    tail: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = 200


class WorkloadExec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`workloads.exec` (duplex): then `ExecInput` items in, `ExecEvent`s out, the last an `ExecExit`."""

    name: WorkloadName
    args: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=4096)], ...], msgspec.Meta(min_length=1, max_length=256)
    ]
    replica: Annotated[int, msgspec.Meta(ge=0)] | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] | None = None  # None: as long as it runs
    tty: bool = False
    stdin: bool = False
    rows: TerminalSize = 24
    cols: TerminalSize = 80


# ---------------------------------------------------------------- views of the state


def workload_state(record: WorkloadRecord, recs: list[AllocationRecord]) -> tuple[str, int]:
    """(state, running replicas) as `ps` shows them."""
    spec = record.spec
    wanted = [r for r in recs if r.desired == "run"]
    running = sum(1 for r in wanted if r.allocation.state == "running")
    if record.stopped:
        return "stopped", running
    if spec.version in record.failed_versions:
        return "failed", running
    if (
        any(r.allocation.version != spec.version for r in wanted if r.allocation.live)
        and record.stable_version != spec.version
    ):
        versions = {r.allocation.version for r in wanted if r.allocation.live}
        if len(versions) > 1:
            return "deploying", running
    if running >= spec.replicas:
        return "running", running
    if any(r.allocation.state == "failed" for r in wanted):
        return "degraded", running
    return "pending", running


def _pending_reason(record: WorkloadRecord, running: int, desired: int) -> str:
    if running >= desired:
        return ""

    return pending_reason(record.explanations)


def node_allocations(fsm: StateMachine, node: str) -> NodeAllocations:
    items = []
    for rec in fsm.allocations_of_node(node):
        a = rec.allocation
        workload = fsm.workloads.get(a.workload)
        if workload is None:
            continue
        spec = workload.history.get(a.version, workload.spec)
        items.append(AssignedAllocation(a, "run" if rec.desired == "run" else "stop", spec))
    return NodeAllocations(node=node, index=fsm.applied_index, items=tuple(items))


def allocation_info(rec: AllocationRecord) -> AllocationInfo:
    a = rec.allocation
    return AllocationInfo(
        id=a.id,
        node=a.node,
        replica=a.replica,
        version=a.version,
        state=a.state,
        desired=rec.desired,
        exit_code=a.exit_code,
        restarts=a.restarts,
        health=rec.health,
        message=rec.message,
    )


def pick_allocations(fsm: StateMachine, name: str, replica: int | None) -> list[AllocationRecord]:
    """The allocations a logs/exec request means: the wanted ones (or the latest per replica)."""
    if name not in fsm.workloads:
        raise NotFound(f"no workload {name}", name=name)
    recs = fsm.allocations_of_workload(name)
    if replica is not None:
        recs = [r for r in recs if r.allocation.replica == replica]
    wanted = [r for r in recs if r.desired == "run" and r.allocation.state != "lost"]
    chosen = wanted or recs[-1:]
    if not chosen:
        where = f" replica {replica}" if replica is not None else ""
        raise NotFound(f"workload {name}{where} has no allocations", name=name)
    # One per replica: the newest.
    latest: dict[int, AllocationRecord] = {}
    for r in chosen:
        latest[r.allocation.replica] = r
    return [latest[k] for k in sorted(latest)]


# ---------------------------------------------------------------- the service


class WorkloadService:
    def __init__(
        self,
        cluster: ClusterView,
        replicated: Proposer,
        rpc: RpcClient,
        events: EventLog,
        node_infos: Callable[[], list[NodeInfo]],
        agent: Agent | None = None,
    ) -> None:
        self.cluster = cluster
        self.replicated = replicated
        self.rpc = rpc
        self.events = events
        self.node_infos = node_infos  # every node as the scheduler sees it, for admission
        self.agent = agent
        self.routing = LeaderRouting(cluster, replicated, rpc)

    def register(self, server: RpcServer) -> None:
        for name, request, handler in (
            ("workloads.run", RunWorkload, self.run),
            ("workloads.ps", PsRequest, self.ps),
            ("workloads.inspect", WorkloadRef, self.inspect),
            ("workloads.scale", ScaleRequest, self.scale),
            ("workloads.update", UpdateRequest, self.update),
            ("workloads.stop", WorkloadRef, self.stop),
            ("workloads.dry_run", DryRun, self.dry_run),
        ):
            self.routing.register_on_leader(server, name, handler, request)
        server.stream("workloads.logs", request=WorkloadLogs)(self.logs)
        server.stream("fwd.workloads.logs", request=WorkloadLogs)(self.routing.forwarded(self._logs_on_leader))
        server.stream("allocations.watch", request=WatchAllocations)(self.watch)
        server.unary("allocations.report", request=ReportBatch)(self.report)
        server.stream("agent.logs", request=LogsRequest)(self.agent_logs)
        server.duplex("workloads.exec", request=WorkloadExec, input=ExecInput)(self.exec)
        server.duplex("fwd.workloads.exec", request=WorkloadExec, input=ExecInput)(
            self.routing.forwarded(self._exec_on_leader)
        )
        server.duplex("agent.exec", request=ExecRequest, input=ExecInput)(self.agent_exec)

    async def _leader_address(self) -> tuple[str, tuple[str, int] | None]:
        leader = await self.replicated.wait_leader()
        if leader == self.cluster.node_id:
            return leader, None
        address = self.cluster.address_of(leader)
        if address is None:
            raise NoLeader(f"leader {leader} has no known address")
        return leader, address

    async def _propose(self, command, client_id: str, seq: int) -> int:
        result, index = await self.replicated.propose(command, client_id=client_id, seq=seq)
        raise_rejected(result)
        return index

    # -- client calls (on the leader) -----------------------------------------

    def _refuse_existing(self, spec: WorkloadSpec, replace: bool) -> None:
        """`run` creates only: a running workload of that name is a conflict."""
        existing = self.replicated.fsm.workloads.get(spec.name)
        if existing is not None and not existing.stopped and not replace:
            raise Conflict(
                f"workload {spec.name} exists (version {existing.spec.version}); use `cloudless update` or `cloudless apply`",
                name=spec.name,
            )

    async def run(self, ctx: RpcContext, req: RunWorkload) -> WorkloadReply:
        spec = validate(req.spec)
        fsm = self.replicated.fsm
        self._refuse_existing(spec, req.replace)
        why = admission_error(spec, self.node_infos())
        if why is not None:
            raise Unschedulable(f"workload {spec.name} can never be placed: {why}", name=spec.name)
        index = await self._propose(SubmitWorkload(spec), req.client_id, req.seq)
        record = fsm.workloads[spec.name]
        self.events.record("workload.submitted", self.cluster.node_id, f"{spec.name} version {record.spec.version}")
        return WorkloadReply(spec.name, record.spec.version, index)

    async def dry_run(self, ctx: RpcContext, req: DryRun) -> Preview:
        spec = validate(req.spec)
        await self.replicated.linearizable()
        self._refuse_existing(spec, req.replace)
        fsm = self.replicated.fsm
        return preview(spec, ControllerState(fsm.workloads, fsm.allocations, self.node_infos()))

    async def ps(self, ctx: RpcContext, req: PsRequest) -> PsReply:
        await self.replicated.linearizable()
        fsm = self.replicated.fsm
        items = []
        for name in sorted(fsm.workloads):
            record = fsm.workloads[name]
            state, running = workload_state(record, fsm.allocations_of_workload(name))
            desired = 0 if record.stopped else record.spec.replicas
            items.append(
                PsItem(
                    name,
                    record.spec.image,
                    desired,
                    running,
                    state,
                    record.spec.version,
                    _pending_reason(record, running, desired),
                )
            )
        return PsReply(items)

    def _record(self, name: str) -> WorkloadRecord:
        record = self.replicated.fsm.workloads.get(name)
        if record is None:
            raise NotFound(f"no workload {name}", name=name)
        return record

    async def inspect(self, ctx: RpcContext, req: WorkloadRef) -> InspectReply:
        await self.replicated.linearizable()
        record = self._record(req.name)
        recs = self.replicated.fsm.allocations_of_workload(req.name)
        state, _ = workload_state(record, recs)
        return InspectReply(
            name=req.name,
            spec=record.spec,
            state=state,
            stopped=record.stopped,
            stable_version=record.stable_version,
            failed_versions=list(record.failed_versions),
            allocations=[allocation_info(r) for r in recs],
            explanations=list(record.explanations),
            pending_reason=_pending_reason(
                record,
                sum(1 for a in recs if a.desired == "run" and a.allocation.state == "running"),
                0 if record.stopped else record.spec.replicas,
            ),
        )

    async def scale(self, ctx: RpcContext, req: ScaleRequest) -> WorkloadReply:
        record = self._record(req.name)
        index = await self._propose(ScaleWorkload(req.name, req.replicas), req.client_id, req.seq)
        return WorkloadReply(req.name, record.spec.version, index)

    async def update(self, ctx: RpcContext, req: UpdateRequest) -> WorkloadReply:
        record = self._record(req.name)
        spec = record.spec
        if req.image is not None:
            spec = msgspec.structs.replace(spec, image=req.image)
        spec = validate(spec)
        index = await self._propose(SubmitWorkload(spec), req.client_id, req.seq)
        record = self._record(req.name)
        return WorkloadReply(req.name, record.spec.version, index)

    async def stop(self, ctx: RpcContext, req: WorkloadRef) -> WorkloadReply:
        record = self._record(req.name)
        index = await self._propose(StopWorkload(req.name), req.client_id, req.seq)
        return WorkloadReply(req.name, record.spec.version, index)

    # -- exec (duplex, relayed like logs) ---------------------------------------

    async def exec(self, ctx: RpcContext, req: WorkloadExec) -> None:
        _clients_only(ctx)
        _, address = await self._leader_address()
        if address is None:
            await self._exec_on_leader(ctx, req)
            return
        # The request exactly as the caller sent it, with its proof: the leader authorizes the caller.
        async with self.rpc.duplex(
            address, "fwd.workloads.exec", ctx.raw_body, item=ExecEvent, proof=ctx.proof
        ) as call:
            await _relay_exec(ctx, call)

    async def _exec_on_leader(self, ctx: RpcContext, req: WorkloadExec) -> None:
        await self.replicated.linearizable()
        target = pick_allocations(self.replicated.fsm, req.name, req.replica)[0]
        address = self._node_address(target.allocation.node)
        request = ExecRequest(
            target.allocation.id, req.args, req.timeout_s, tty=req.tty, stdin=req.stdin, rows=req.rows, cols=req.cols
        )
        async with self.rpc.duplex(address, "agent.exec", request, item=ExecEvent) as call:
            await _relay_exec(ctx, call)

    def _node_address(self, node_id: str) -> tuple[str, int]:
        address = self.cluster.address_of(node_id)
        if address is None:
            raise Unavailable(f"node {node_id} has no known address", node=node_id)
        return address

    # -- logs (streamed through the cluster) ------------------------------------

    async def logs(self, ctx: RpcContext, req: WorkloadLogs) -> None:
        _clients_only(ctx)
        _, address = await self._leader_address()
        if address is None:
            await self._logs_on_leader(ctx, req)
            return
        # The caller's bytes and proof, so the leader authorizes the caller, not us.
        async with self.rpc.stream(address, "fwd.workloads.logs", ctx.raw_body, item=LogLine, proof=ctx.proof) as items:
            async for line in items:
                await ctx.send(line)

    async def _logs_on_leader(self, ctx: RpcContext, req: WorkloadLogs) -> None:
        await self.replicated.linearizable()
        targets = pick_allocations(self.replicated.fsm, req.name, req.replica)

        async def relay(rec: AllocationRecord, deliver) -> None:
            a = rec.allocation
            address = self._node_address(a.node)
            request = LogsRequest(a.id, follow=req.follow, tail=req.tail)
            timeout = None if req.follow else 30.0
            async with self.rpc.stream(address, "agent.logs", request, item=LogLine, timeout=timeout) as items:
                async for line in items:
                    await deliver(line)

        if not req.follow:
            # One replica after the other, so each replica's lines stay together.
            for rec in targets:
                await relay(rec, ctx.send)
            return
        send, receive = trio.open_memory_channel(256)

        async def relay_into(rec: AllocationRecord, out: trio.MemorySendChannel) -> None:
            async with out:
                await relay(rec, out.send)

        try:
            async with trio.open_nursery() as nursery:
                async with send:
                    for rec in targets:
                        nursery.start_soon(relay_into, rec, send.clone())
                async for line in receive:
                    await ctx.send(line)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def agent_logs(self, ctx: RpcContext, req: LogsRequest) -> None:
        agent = self._local_agent(ctx)
        cid = agent.container_of(req.allocation)
        runtime = agent.runtime
        replica = _replica_of(agent, req.allocation)
        if req.tail is None:  # everything kept, then (following) whatever comes after it
            records = await runtime.read_logs(cid, 0)
            since = records[-1].offset + 1 if records else 0
        else:  # docker's --tail N: the last N only; following starts after the newest, not at its tail
            records, since = await runtime.read_logs_from_end(cid, req.tail)
        for r in records:
            await ctx.send(LogLine(req.allocation, replica, r.stream, r.text, r.ts))
        if req.follow:
            async for r in runtime.follow_logs(cid, since):
                await ctx.send(LogLine(req.allocation, replica, r.stream, r.text, r.ts))

    async def agent_exec(self, ctx: RpcContext, req: ExecRequest) -> None:
        agent = self._local_agent(ctx)
        cid = agent.container_of(req.allocation)
        deadline = trio.current_time() + req.timeout_s if req.timeout_s is not None else math.inf
        with trio.CancelScope(deadline=deadline) as scope:
            async with agent.runtime.exec_session(
                cid, list(req.args), tty=req.tty, stdin=req.stdin, rows=req.rows, cols=req.cols
            ) as session:

                async def feed() -> None:
                    stdin_open = req.stdin  # without -i the process reads /dev/null; stdin items are dropped
                    while (message := await ctx.receive()) is not None:
                        if isinstance(message, ExecStdin) and stdin_open:
                            await session.write_stdin(message.data)
                        elif isinstance(message, ExecStdinClose) and stdin_open:
                            stdin_open = False
                            await session.close_stdin()
                        elif isinstance(message, ExecResize):
                            session.resize(message.rows, message.cols)
                    if stdin_open:
                        await session.close_stdin()  # the caller ended its input

                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(feed)
                        while (output := await session.read_output()) is not None:
                            await ctx.send(ExecOutput(*output))
                        exit_code = await session.wait()
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    raise _first_error(group) from None
        if scope.cancelled_caught:
            raise ExecTimeout(f"exec in {req.allocation} exceeded {req.timeout_s}s", allocation=req.allocation)
        await ctx.send(ExecExit(exit_code))

    def _local_agent(self, ctx: RpcContext) -> Agent:
        if ctx.peer.kind != "node":
            raise PermissionDenied("agent.* methods are for nodes (clients go through workloads.*)")
        if self.agent is None:
            raise Unavailable(f"node {self.cluster.node_id} runs no agent")
        return self.agent

    # -- the agent's side -------------------------------------------------------

    async def watch(self, ctx: RpcContext, req: WatchAllocations) -> None:
        if ctx.peer.kind != "node" or ctx.peer.name != req.node:
            raise PermissionDenied("a node watches its own allocations only")
        replicated = self.replicated
        last: NodeAllocations | None = None
        last_sent = -1e9
        while True:
            if not replicated.is_leader:
                raise NotLeader("not the leader", leader=replicated.leader or "")
            current = node_allocations(replicated.fsm, req.node)
            now = trio.current_time()
            if last is None or current.items != last.items or now - last_sent >= HEARTBEAT_S:
                await ctx.send(current)
                last, last_sent = current, now
            with trio.move_on_after(HEARTBEAT_S):
                await replicated.wait_changed()

    async def report(self, ctx: RpcContext, req: ReportBatch) -> ReportAck:
        if ctx.peer.kind != "node" or ctx.peer.name != req.node:
            raise PermissionDenied("a node reports its own allocations only")
        if not self.replicated.is_leader:
            # Passing it on would make us the proposer of another node's report.
            raise NotLeader("not the leader", leader=self.replicated.leader or "")
        result, index = await self.replicated.propose(ReportAllocations(req.node, req.reports))
        raise_rejected(result)
        return ReportAck(index)


def _clients_only(ctx: RpcContext) -> None:
    # Logs and exec reach into containers: client identities only, whatever the permission
    # table says of roles (nodes relay through fwd.*/agent.* and never start one).
    if ctx.peer.kind != "client":
        raise PermissionDenied(f"{ctx.method} is for client identities")


async def _relay_exec(ctx: RpcContext, call) -> None:
    """Pass a duplex exec call on: the caller's input one way, the events back, each hop flow-controlled."""

    async def forward_input() -> None:
        while (message := await ctx.receive()) is not None:
            await call.send(message)
        await call.end()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward_input)
            async for event in call:
                await ctx.send(event)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _first_error(group) from None  # the typed error the caller should see, not trio's group


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a relay nursery: the first typed one, else the group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if isinstance(exc, CloudlessError):
            return exc
    return group


def _replica_of(agent: Agent, allocation_id: str) -> int:
    for a in agent.assigned.items:
        if a.allocation.id == allocation_id:
            return a.allocation.replica
    return 0
