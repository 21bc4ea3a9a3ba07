"""The workload controller's trio driver: on the Raft leader, gather the inputs
(the state machine, gossip membership), run the pure
`cloudless.coordinator.controller.reconcile`, propose its plan, and sleep
until something changes or a waiting decision becomes due."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import trio

from cloudless.coordinator.controller import ControllerState, build_view, reconcile
from cloudless.errors import CloudlessError
from cloudless.gossip.metadata import ARCH_LABEL, CLASS_LABEL, RUNTIME_LABEL, RUNTIMES
from cloudless.ports import ClusterView, EventRecorder, Proposer
from cloudless.scheduler import NodeInfo

log = logging.getLogger(__name__)

_STATE_NAMES = {0: "alive", 1: "suspect", 2: "dead", 3: "left"}


def node_infos(
    cluster: ClusterView, replicated: Proposer, uptime_and_flaps: Callable[[str], tuple[float, int]]
) -> list[NodeInfo]:
    """Registered nodes as the scheduler sees them: attributes from the registry
    and gossip metadata, state from gossip membership, uptime and flaps from
    the coordinator's record of membership changes."""
    out: list[NodeInfo] = []
    for name, reg in replicated.fsm.nodes.items():
        if name == cluster.node_id:
            state, meta = "alive", cluster.metadata()
        else:
            member = cluster.member(name)
            if member is None:
                state, meta = "suspect", None
            else:
                state, meta = _STATE_NAMES.get(member.state, "suspect"), member.meta
        labels = dict(reg.labels)
        if meta is not None:
            labels = {**meta.labels, **labels}
        arch = labels.pop(ARCH_LABEL, "")
        device_class = labels.pop(CLASS_LABEL, "server")
        runtime = labels.pop(RUNTIME_LABEL, "")
        if runtime not in RUNTIMES:
            runtime = ""  # unknown word from a newer node: not refused for it
        if device_class not in ("server", "pc", "laptop", "phone", "gateway"):
            device_class = "server"
        uptime_s, flaps = 0.0, 0
        if state == "alive":
            uptime_s, flaps = uptime_and_flaps(name)
            # Whole minutes: the controller rebuilds its view when node
            # infos change, and uptime changes every call.
            uptime_s = float(int(uptime_s // 60) * 60)
        out.append(
            NodeInfo(
                node_id=name,
                state=state,  # type: ignore[arg-type]
                arch=arch,
                device_class=device_class,  # type: ignore[arg-type]
                uptime_s=uptime_s,
                flaps=flaps,
                region=reg.region or (meta.region if meta else ""),
                zone=reg.zone or (meta.zone if meta else ""),
                labels=labels,
                cpu_millis=meta.capacity.cpu_millis if meta else 0,
                memory_bytes=meta.capacity.memory_bytes if meta else 0,
                power=meta.power if meta else "ac",
                battery_percent=meta.battery_percent if meta else None,
                charging=bool(meta.charging) if meta else False,
                network=meta.network if meta else "wired",
                metered=bool(meta.metered) if meta else False,
                runtime=runtime,
            )
        )
    return out


class WorkloadController:
    """Runs `reconcile` on the leader whenever the state or membership changes."""

    def __init__(
        self,
        cluster: ClusterView,
        replicated: Proposer,
        events: EventRecorder,
        nodes: Callable[[], list[NodeInfo]],
        *,
        interval: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.replicated = replicated
        self.events = events
        self.nodes = nodes
        self.interval = interval
        self.rng = rng or random.Random()
        self.rounds = 0
        self._wake = trio.Event()
        self._view: tuple | None = None
        cluster.add_member_listener(lambda event: self._poke())
        replicated.change_listeners.append(lambda changes: self._poke())

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        replicated = self.replicated
        while True:
            wake_at = None
            if replicated.is_leader and replicated.fsm.workloads:
                try:
                    wake_at = await self.step()
                except CloudlessError as exc:
                    log.warning("controller.step_failed", extra={"fields": {"error": str(exc)}})
            timeout = self.interval
            if wake_at is not None:
                timeout = max(0.05, min(timeout, wake_at - time.time()))
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(0.05)  # coalesce bursts of changes into one round

    def _poke(self) -> None:
        self._wake.set()

    async def step(self) -> float | None:
        fsm = self.replicated.fsm
        nodes = self.nodes()
        state = ControllerState(fsm.workloads, fsm.allocations, nodes)
        # The indexed view is rebuilt only when nodes or allocations changed.
        key = (fsm.applied_index, tuple(nodes))
        if self._view is None or self._view[0] != key:
            self._view = (key, build_view(state))
        decision = reconcile(state, time.time(), self.rng, self._view[1])
        self.rounds += 1
        if decision.plan is not None:
            plan = decision.plan
            await self.replicated.propose(plan, timeout=5.0)
            for a in plan.create:
                log.info("controller.placed", extra={"fields": {"allocation": a.id, "node": a.node}})
            node_id = self.cluster.node_id
            if plan.lost:
                self.events.record(
                    "workload.lost", node_id, f"{len(plan.lost)} allocation(s) lost: {', '.join(plan.lost)}"
                )
            for name, version in plan.revert.items():
                self.events.record(
                    "workload.rollout_failed", node_id, f"{name} version {version} failed its health gate"
                )
        return decision.wake_at
