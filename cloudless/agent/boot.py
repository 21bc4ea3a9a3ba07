"""Workloads inside the node process: the agent (every node), the workload
controller (acts on the leader only) and the workload API, started from
`Node.run` with `await nursery.start(run_workloads, node)`.

The runtime is the one the node detected and advertises (`Node.runtime`,
`node.device.detect_runtime`): runc when this process may drive it (root,
runc, cgroups), rootless runc when it is not root (sandbox/rootless.py);
`--runtime`/`CLOUDLESS_RUNTIME=memory` selects the in-memory twin
(benchmarks and tests of scheduling without containers), `none` runs no agent.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import trio

from cloudless.agent.agent import Agent
from cloudless.agent.containers import ImageRootfs, MemoryRootfs
from cloudless.agent.images_from_peers import node_oci_blobs
from cloudless.agent.local import LocalAllocations
from cloudless.agent.source import ClusterSource
from cloudless.api.workloads import WorkloadService
from cloudless.coordinator.controller import WorkloadController

if TYPE_CHECKING:
    from cloudless.node.process import Node

log = logging.getLogger(__name__)


async def run_workloads(node: Node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    kind = node.runtime
    agent: Agent | None = None
    root = node.data.root / "agent"
    if kind in ("runc", "rootless"):
        from cloudless.sandbox.rootless import detect_host
        from cloudless.sandbox.runc import RuncRuntime

        rootless = detect_host() if kind == "rootless" else None
        if rootless is not None:
            log.info(
                "agent.rootless",
                extra={"fields": {"subordinate_ids": rootless.subordinate, "unenforced": rootless.unenforced()}},
            )
        agent = Agent(
            node.node_id,
            RuncRuntime(root / "sandbox", rootless=rootless),
            ClusterSource(node),
            LocalAllocations(root),
            ImageRootfs(
                node.data.root / "images", oci_blobs=node_oci_blobs(node), node_id=node.node_id, events=node.events
            ),
            rng=random.Random(),
            stop_grace=5.0,
        )
    elif kind == "memory":
        from cloudless.sandbox.memory import MemoryRuntime

        agent = Agent(
            node.node_id,
            MemoryRuntime(),
            ClusterSource(node),
            LocalAllocations(root),
            MemoryRootfs(),
            rng=random.Random(),
        )
    else:
        log.warning(
            "agent.disabled",
            extra={"fields": {"node": node.node_id, "reason": node.runtime_reason}},
        )
    WorkloadService(node, agent).register(node.server)
    from cloudless.api.images import ImageApi

    ImageApi(
        node.node_id,
        node_oci_blobs(node),
        node.data.root / "tmp" / "images",
        local=getattr(agent.rootfs, "peers", None) if agent is not None else None,
        events=node.events,
    ).register(node.server)
    controller = WorkloadController(node)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        if agent is not None:
            await nursery.start(agent.run)
            peers = getattr(agent.rootfs, "peers", None)
            if peers is not None:  # publish what `cloudless image import/pull` adds here
                nursery.start_soon(peers.publish_loop)
        log.info("agent.ready", extra={"fields": {"node": node.node_id, "runtime": kind}})
        task_status.started()
