"""Coordinator duties, performed only by the Raft leader: finishing the
cluster's bootstrap and autopilot (which members are voters).

Autopilot itself is pure (`cloudless.coordinator.autopilot`); this loop
gathers its inputs from gossip and Raft, applies the first action it returns
as one Raft configuration change, and records the decision as an event.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable

import trio

from cloudless.coordinator.autopilot import Action, AutopilotConfig, Candidate, plan
from cloudless.coordinator.ca_rotation import ca_rotation_step
from cloudless.errors import CloudlessError
from cloudless.gossip.events import MemberAlive, MemberDead, MemberJoined, MemberLeft, MemberSuspect
from cloudless.gossip.members import ALIVE, DEAD, LEFT, SUSPECT
from cloudless.node.gossip_identity import rotation_step
from cloudless.node.replicated import ReplicatedState
from cloudless.ports import ClusterView, EventRecorder
from cloudless.raft.messages import ConfChange, ConfChangeType
from cloudless.state.commands import ActivateNextCA, Rejected

log = logging.getLogger(__name__)

FLAP_WINDOW_S = 600.0
# A learner within this many entries of the leader's log counts as caught up.
CAUGHT_UP_ENTRIES = 64
# A new leader waits this long before changing membership, so gossip has
# time to tell it who is alive.
SETTLE_S = 3.0
_STATE_NAMES: dict[int, str] = {ALIVE: "alive", SUSPECT: "suspect", DEAD: "dead", LEFT: "left"}


class Coordinator:
    def __init__(
        self,
        cluster: ClusterView,
        replicated: ReplicatedState,
        events: EventRecorder,
        config: AutopilotConfig,
        *,
        complete_bootstrap: Callable[[], Awaitable[None]],
        own_uptime: Callable[[], float],
        count_decision: Callable[[str], None] = lambda kind: None,
        interval: float = 0.5,
    ) -> None:
        self.cluster = cluster
        self.replicated = replicated
        self.events = events
        self.config = config
        self.complete_bootstrap = complete_bootstrap  # leader-only bootstrap duties (idempotent)
        self.own_uptime = own_uptime
        self.count_decision = count_decision  # metrics: decisions by kind
        self.interval = interval
        self._flaps: dict[str, deque[float]] = defaultdict(deque)
        self._alive_since: dict[str, float] = {}
        self._down_since: dict[str, float] = {}
        self._leader_since: float | None = None
        self._last_plan: tuple = ()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.cluster.add_member_listener(self._on_member_event)
        task_status.started()
        replicated = self.replicated
        while True:
            await trio.sleep(self.interval)
            if not replicated.is_leader:
                self._leader_since = None
                continue
            now = trio.current_time()
            if self._leader_since is None:
                self._leader_since = now
                self.events.record(
                    "raft.leader_elected", self.cluster.node_id, f"leader for term {replicated.core.term}"
                )
            try:
                await self.complete_bootstrap()
                await self.gossip_key_step()
                await self.ca_rotation_step()
                if now - self._leader_since >= SETTLE_S:
                    await self.autopilot_step(now)
            except CloudlessError as exc:
                log.warning("coordinator.step_failed", extra={"fields": {"error": str(exc)}})

    async def gossip_key_step(self) -> None:
        """After a node is removed, rotate the gossip key (gossip_identity.rotation_step)."""
        replicated = self.replicated
        command = rotation_step(replicated.fsm, time.time())
        if command is None:
            return
        result, _ = await replicated.propose(command)
        if isinstance(result, Rejected):
            raise CloudlessError(f"gossip key rotation refused: {result.message}")
        what = "new primary gossip key" if len(command.keys) > 1 else "old gossip key dropped"
        self.events.record("gossip.key_rotated", self.cluster.node_id, what, keys=len(command.keys))

    async def ca_rotation_step(self) -> None:
        """Activate the next CA, then retire the previous one (coordinator/ca_rotation.py)."""
        replicated = self.replicated
        command = ca_rotation_step(replicated.fsm, time.time())
        if command is None:
            return
        result, _ = await replicated.propose(command)
        if isinstance(result, Rejected):
            raise CloudlessError(f"CA rotation step refused: {result.message}")
        what = "next CA activated" if isinstance(command, ActivateNextCA) else "previous CA retired"
        self.events.record("ca.rotation_step", self.cluster.node_id, what, key_id=command.key_id)

    def _on_member_event(self, event) -> None:
        now = trio.current_time()
        if isinstance(event, (MemberSuspect, MemberDead)):
            # One failure is one flap, whether or not a suspicion preceded it.
            if event.name not in self._down_since:
                self._flaps[event.name].append(now)
                self._down_since[event.name] = now
            self._alive_since.pop(event.name, None)
        elif isinstance(event, (MemberJoined, MemberAlive)):
            self._alive_since[event.name] = now
            self._down_since.pop(event.name, None)
        elif isinstance(event, MemberLeft):
            self._alive_since.pop(event.name, None)
            self._down_since.pop(event.name, None)

    def uptime_and_flaps(self, name: str) -> tuple[float, int]:
        """Seconds since the member was last seen becoming alive, and its recent failures."""
        now = trio.current_time()
        if name == self.cluster.node_id:
            return self.own_uptime(), self.flaps(name, now)
        member = self.cluster.member(name)
        since = self._alive_since.get(name, member.state_change if member is not None else now)
        return max(0.0, now - since), self.flaps(name, now)

    def flaps(self, name: str, now: float) -> int:
        flaps = self._flaps.get(name)
        if not flaps:
            return 0
        while flaps and flaps[0] < now - FLAP_WINDOW_S:
            flaps.popleft()
        return len(flaps)

    def candidates(self, now: float) -> list[Candidate]:
        cluster = self.cluster
        replicated = self.replicated
        conf = replicated.core.conf_state
        progress = replicated.core.status().get("progress")
        if not isinstance(progress, dict):  # only a leader has its followers' progress
            progress = {}
        last_index = replicated.core.log.last_index()
        out: list[Candidate] = []
        # Only registered nodes can become members: Raft needs their address.
        names = set(replicated.fsm.nodes) | set(conf.voters) | set(conf.learners)
        for name in sorted(names):
            member = cluster.member(name)
            if name == cluster.node_id:
                state = "alive"
                meta = cluster.metadata()
                alive_since = now - self.own_uptime()
            elif member is None:
                # Not heard of through gossip (yet): never promote, never count as healthy.
                state, meta, alive_since = "suspect", None, now
            else:
                state = _STATE_NAMES.get(member.state, "suspect")
                meta = member.meta
                alive_since = self._alive_since.setdefault(name, member.state_change)
            role = "voter" if name in conf.voters else "learner" if name in conf.learners else "none"
            pr = progress.get(name)
            caught_up = pr is not None and bool(pr) and int(pr["match"]) >= last_index - CAUGHT_UP_ENTRIES
            network = "wired"
            if meta is not None:
                network = "metered" if meta.metered or meta.network == "cellular" else meta.network
            out.append(
                Candidate(
                    node_id=name,
                    state=state,  # type: ignore[arg-type]
                    raft_role=role,  # type: ignore[arg-type]
                    power=meta.power if meta is not None else "ac",
                    battery_pct=float(meta.battery_percent)
                    if meta is not None and meta.battery_percent is not None
                    else None,
                    charging=bool(meta.charging) if meta is not None else False,
                    network=network,  # type: ignore[arg-type]
                    zone=meta.zone if meta is not None else "",
                    alive_since=alive_since,
                    flaps=self.flaps(name, now),
                    caught_up=caught_up,
                    trusted=name in replicated.fsm.nodes and replicated.fsm.nodes[name].trusted,
                    down_since=self._down_since.get(
                        name, member.state_change if member is not None and state in ("suspect", "dead") else None
                    ),
                )
            )
        return out

    async def autopilot_step(self, now: float) -> Action | None:
        replicated = self.replicated
        candidates = self.candidates(now)
        result = plan(candidates, self.cluster.node_id, now, self.config)
        if not result.actions:
            return None
        action = result.actions[0]
        if action.kind == "transfer_leadership":
            replicated.driver.transfer_leadership(action.node_id)
        else:
            change_type = {
                "add_learner": ConfChangeType.ADD_LEARNER,
                "promote": ConfChangeType.ADD_VOTER,
                "demote": ConfChangeType.ADD_LEARNER,
                "remove": ConfChangeType.REMOVE_NODE,
            }[action.kind]
            await replicated.propose_conf_change(ConfChange(int(change_type), action.node_id))
        self.count_decision(action.kind)
        self.events.record(
            f"autopilot.{action.kind}", action.node_id, action.reason, desired=",".join(result.desired_voters)
        )
        return action
