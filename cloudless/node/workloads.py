"""Workloads inside the node process: the agent (every node), the workload
controller (acts on the leader only) and the workload API, built by `Node`
and run in its nursery.

The runtime is the one the node detected and advertises (`Node.runtime`,
`node.device.detect_runtime`): runc when this process may drive it (root,
runc, cgroups), rootless runc when it is not root (sandbox/rootless.py);
`--runtime`/`CLOUDLESS_RUNTIME=memory` selects the in-memory twin
(benchmarks and tests of scheduling without containers), `none` runs no agent.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import trio

from cloudless.agent.agent import Agent
from cloudless.agent.containers import ImageRootfs, MemoryRootfs
from cloudless.agent.images_from_peers import PeerImages
from cloudless.agent.local import LocalAllocations
from cloudless.agent.source import ClusterSource
from cloudless.api.images import ImageApi
from cloudless.api.workloads import WorkloadService
from cloudless.blobs.oci import OciBlobs
from cloudless.node.controller import WorkloadController
from cloudless.observability.events import EventLog
from cloudless.ports import ClusterView, Proposer
from cloudless.sandbox.memory import MemoryRuntime
from cloudless.sandbox.rootless import detect_host
from cloudless.sandbox.runc import RuncRuntime
from cloudless.scheduler import NodeInfo
from cloudless.transport.rpc import RpcClient, RpcServer

log = logging.getLogger(__name__)


class Workloads:
    """The agent (None when this node runs no containers), the controller, the
    workload API and the cluster image API, wired to the node's ports."""

    def __init__(
        self,
        *,
        runtime: str,
        runtime_reason: str,
        root: Path,
        images_dir: Path,
        cluster: ClusterView,
        leader_address: Callable[[], tuple[str, int] | None],
        replicated: Proposer,
        rpc: RpcClient,
        server: RpcServer,
        events: EventLog,
        nodes: Callable[[], list[NodeInfo]],
        oci_blobs: OciBlobs,
    ) -> None:
        self.kind = runtime
        self.runtime_reason = runtime_reason
        self.node_id = cluster.node_id
        agent_dir = root / "agent"
        source = ClusterSource(rpc, leader_address)
        self.agent: Agent | None = None
        self.peer_images: PeerImages | None = None
        if self.kind in ("runc", "rootless"):
            rootless = detect_host() if self.kind == "rootless" else None
            if rootless is not None:
                log.info(
                    "agent.rootless",
                    extra={"fields": {"subordinate_ids": rootless.subordinate, "unenforced": rootless.unenforced()}},
                )
            rootfs = ImageRootfs(images_dir, oci_blobs=lambda: oci_blobs, node_id=cluster.node_id, events=events)
            self.peer_images = rootfs.peers
            self.agent = Agent(
                cluster.node_id,
                RuncRuntime(agent_dir / "sandbox", rootless=rootless),
                source,
                LocalAllocations(agent_dir),
                rootfs,
                rng=random.Random(),
                stop_grace=5.0,
            )
        elif self.kind == "memory":
            self.agent = Agent(
                cluster.node_id,
                MemoryRuntime(),
                source,
                LocalAllocations(agent_dir),
                MemoryRootfs(),
                rng=random.Random(),
            )
        WorkloadService(cluster, replicated, rpc, events, nodes, self.agent).register(server)
        ImageApi(
            cluster.node_id,
            lambda: oci_blobs,
            root / "tmp" / "images",
            local=self.peer_images,
            events=events,
        ).register(server)
        self.controller = WorkloadController(cluster, replicated, events, nodes)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.agent is None:
            log.warning(
                "agent.disabled",
                extra={"fields": {"node": self.node_id, "reason": self.runtime_reason}},
            )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.controller.run)
            if self.agent is not None:
                await nursery.start(self.agent.run)
            if self.peer_images is not None:  # publish what `cloudless image import/pull` adds here
                nursery.start_soon(self.peer_images.publish_loop)
            log.info("agent.ready", extra={"fields": {"node": self.node_id, "runtime": self.kind}})
            task_status.started()
