"""Where a client call runs: here, or on the Raft leader.

Calls that need the leader's view run there; a follower forwards once, to
`fwd.<method>`, which refuses to forward again (NotLeader), so a call never
loops between nodes during an election. Reads need a copy of the state: a
Raft member serves them itself (ReadIndex keeps them linearizable), a node
outside the configuration asks the leader.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cloudless.authz import PermissionDenied
from cloudless.ports import ClusterView, Proposer
from cloudless.raft.core import NotLeader
from cloudless.raft.errors import NoLeader, NotAMember
from cloudless.transport.rpc import RpcClient, RpcContext, RpcServer

Handler = Callable[[RpcContext, Any], Awaitable[Any]]

FORWARD_TIMEOUT_CAP = 60.0


class LeaderRouting:
    def __init__(self, cluster: ClusterView, replicated: Proposer, rpc: RpcClient) -> None:
        self.cluster = cluster
        self.replicated = replicated
        self.rpc = rpc

    def register_on_leader(self, server: RpcServer, name: str, handler: Handler, request: Any) -> None:
        server.unary(name, request=request)(self.on_leader(name, handler))
        server.unary(f"fwd.{name}", request=request)(self.forwarded(handler))

    def register_on_member(self, server: RpcServer, name: str, handler: Handler, request: Any) -> None:
        server.unary(name, request=request)(self.on_member(name, handler))
        server.unary(f"fwd.{name}", request=request)(self.forwarded(handler))

    async def _forward(self, ctx: RpcContext, name: str, req: Any) -> Any:
        if ctx.peer.kind not in ("client", "node"):
            raise PermissionDenied(f"{name}: callers must be clients or nodes")
        leader = await self.replicated.wait_leader()
        address = self.cluster.address_of(leader)
        if address is None:
            raise NoLeader(f"leader {leader} has no known address")
        timeout = max(1.0, min(ctx.time_left, FORWARD_TIMEOUT_CAP))
        # The request exactly as the caller sent it, with its proof: the leader
        # authorizes the caller by its signature over these bytes, not us.
        return await self.rpc.call(address, f"fwd.{name}", ctx.raw_body, timeout=timeout, proof=ctx.proof)

    def on_leader(self, name: str, handler: Handler) -> Handler:
        async def run(ctx: RpcContext, req: Any) -> Any:
            if await self.replicated.wait_leader() == self.cluster.node_id:
                return await handler(ctx, req)
            return await self._forward(ctx, name, req)

        return run

    def on_member(self, name: str, handler: Handler) -> Handler:
        async def run(ctx: RpcContext, req: Any) -> Any:
            if self.replicated.is_member:
                try:
                    return await handler(ctx, req)
                except NotAMember:
                    pass  # removed while away: the leader serves it
            return await self._forward(ctx, name, req)

        return run

    def forwarded(self, handler: Handler) -> Handler:
        async def run(ctx: RpcContext, req: Any) -> Any:
            if ctx.peer.kind != "node":
                raise PermissionDenied("fwd.* methods are for nodes")
            if not self.replicated.is_leader:
                raise NotLeader("not the leader", leader=self.replicated.leader or "")
            return await handler(ctx, req)

        return run
