"""The agent: makes this node run exactly the allocations the cluster assigns it.

    Agent.run
    ├── Supervisor.run   adopts the containers that survived a restart (no duplicates)
    ├── _watch_loop      allocations.watch from the leader; every set is persisted
    │                    (fsynced) before it is acted on; reconnects with backoff
    ├── _reconcile_loop  wanted set → ensure / remove containers
    ├── _event_loop      supervisor events → per-allocation status
    └── _report_loop     batches status changes to the leader; keeps them while
                         disconnected and sends everything again on reconnection

Disconnected mode: on start the agent reads its last persisted set and runs it
without waiting for any coordinator, so a node that reboots while cut off
brings its replicas back. Whatever the cluster decided meanwhile arrives with
the first set after reconnection: allocations it replaced elsewhere are no
longer wanted here (stopped, or gone from the set) and are removed, so no
duplicate survives.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import trio

from cloudless.agent.containers import ALLOCATION_LABEL, RootfsProvider, container_id, container_spec
from cloudless.agent.local import LocalAllocations
from cloudless.agent.messages import AssignedAllocation, NodeAllocations, ReportBatch
from cloudless.agent.source import AllocationSource
from cloudless.errors import CloudlessError
from cloudless.sandbox import supervisor as sv
from cloudless.sandbox.runtime import ContainerNotFound, ContainerRuntime, ContainerSpec
from cloudless.state.commands import AllocationReport

log = logging.getLogger(__name__)

SUPERVISOR_NAME = "agent"
REPORT_INTERVAL_S = 0.1
RECONNECT_INITIAL_S = 0.2
RECONNECT_MAX_S = 5.0
MAX_REPORTS_PER_BATCH = 1000


@dataclass
class Observed:
    """What the agent last saw of one allocation."""

    state: str = "pending"
    exit_code: int | None = None
    restarts: int = 0
    health: str = ""
    message: str = ""

    def report(self, allocation_id: str) -> AllocationReport:
        return AllocationReport(
            allocation_id,
            self.state,
            exit_code=self.exit_code,
            restarts=self.restarts,
            health=self.health,
            message=self.message[:1024],
        )


class Agent:
    def __init__(
        self,
        node_id: str,
        runtime: ContainerRuntime,
        source: AllocationSource,
        local: LocalAllocations,
        rootfs: RootfsProvider,
        *,
        rng: random.Random | None = None,
        stop_grace: float = 10.0,
        supervisor_name: str = SUPERVISOR_NAME,
        in_thread=trio.to_thread.run_sync,
    ) -> None:
        self.node_id = node_id
        self.runtime = runtime
        self.source = source
        self.local = local
        self.rootfs = rootfs
        self.rng = rng or random.Random()
        self.stop_grace = stop_grace
        self.supervisor_name = supervisor_name
        # Blocking file IO (the fsynced local state) runs through this; tests
        # under MockClock run it inline so the clock cannot jump past it.
        self._in_thread = in_thread
        self.assigned = NodeAllocations(node=node_id, index=0)
        self.observed: dict[str, Observed] = {}
        self.connected = False
        self.supervisor: sv.Supervisor | None = None
        self._unreported: set[str] = set()
        self._unavailable: set[str] = set()  # allocations whose image could not be prepared
        self._changed = trio.Event()
        self._report_wake = trio.Event()
        self.reconciled = trio.Event()  # set after each reconcile pass (tests wait on it)

    # ------------------------------------------------------------ service

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.assigned = await self._in_thread(self.local.load, self.node_id)
        wanted_ids = {container_id(a) for a in self.assigned.wanted()}
        send, receive = trio.open_memory_channel(10_000)
        self.supervisor = sv.Supervisor(
            self.runtime, name=self.supervisor_name, rng=self.rng, events=send, stop_grace=self.stop_grace
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._event_loop, receive)
            adopted = await nursery.start(self.supervisor.run, lambda spec: spec.id in wanted_ids)
            log.info(
                "agent.started",
                extra={"fields": {"node": self.node_id, "adopted": len(adopted), "known": len(self.assigned.items)}},
            )
            nursery.start_soon(self._reconcile_loop)
            nursery.start_soon(self._watch_loop)
            nursery.start_soon(self._report_loop)
            task_status.started()

    def _poke(self) -> None:
        self._changed.set()

    # ------------------------------------------------------------ watching

    async def _watch_loop(self) -> None:
        delay = RECONNECT_INITIAL_S
        while True:
            try:
                async with self.source.watch(self.node_id) as sets:
                    async for allocations in sets:
                        if not self.connected:
                            self.connected = True
                            delay = RECONNECT_INITIAL_S
                            # The cluster may have missed anything while we were away: tell it all.
                            self._unreported.update(self.observed)
                            self._report_wake.set()
                            log.info(
                                "agent.connected", extra={"fields": {"node": self.node_id, "index": allocations.index}}
                            )
                        await self._accept(allocations)
            except CloudlessError as exc:
                if self.connected:
                    log.warning("agent.disconnected", extra={"fields": {"node": self.node_id, "error": str(exc)}})
                self.connected = False
            await trio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(RECONNECT_MAX_S, delay * 2)

    async def _accept(self, allocations: NodeAllocations) -> None:
        if allocations.items == self.assigned.items:
            return  # a heartbeat, or a change elsewhere in the cluster
        # Durable first: a reboot right after this runs what we were told.
        await self._in_thread(self.local.save, allocations)
        before = self.assigned.wanted()
        self.assigned = allocations
        supervised = set(self.supervisor.supervised()) if self.supervisor is not None else set()
        for a in allocations.items:
            alloc_id = a.allocation.id
            if alloc_id in self.observed:
                continue
            if a.desired == "run":
                self.observed[alloc_id] = Observed()
                self._unreported.add(alloc_id)
            elif a.allocation.live and container_id(alloc_id) not in supervised:
                # To be stopped, and nothing of it runs here (e.g. gone with a reboot): say so.
                self._observe(alloc_id, state="exited", exit_code=a.allocation.exit_code)
        gone = set(before) - set(allocations.wanted())
        self._unavailable -= gone
        self._poke()

    # ------------------------------------------------------------ reconciling

    async def _reconcile_loop(self) -> None:
        while True:
            self._changed = trio.Event()
            try:
                await self.reconcile()
            except CloudlessError as exc:
                log.warning("agent.reconcile_failed", extra={"fields": {"error": str(exc)}})
            self.reconciled.set()
            self.reconciled = trio.Event()
            with trio.move_on_after(5.0):  # periodic pass: retries what failed
                await self._changed.wait()

    async def reconcile(self) -> None:
        supervisor = self.supervisor
        assert supervisor is not None
        wanted = self.assigned.wanted()
        by_container = {container_id(a): a for a in wanted}
        supervised = set(supervisor.supervised())
        for cid in sorted(supervised - set(by_container)):
            await self._remove(cid)
        # Containers of ours the supervisor does not watch (e.g. it gave up and they were removed) are not adopted here.
        for cid, alloc_id in sorted(by_container.items()):
            if cid in supervised or alloc_id in self._unavailable:
                continue
            await self._start(wanted[alloc_id])

    async def _start(self, assigned: AssignedAllocation) -> None:
        supervisor = self.supervisor
        assert supervisor is not None
        allocation = assigned.allocation
        cid = container_id(allocation.id)
        self._observe(allocation.id, state="starting")
        prepared = False
        try:
            rootfs, image = await self.rootfs.prepare(cid, assigned.spec.image)
            prepared = True
            spec: ContainerSpec = container_spec(allocation, assigned.spec, rootfs, image)
            await supervisor.ensure(spec)
        except CloudlessError as exc:
            log.warning("agent.start_failed", extra={"fields": {"allocation": allocation.id, "error": exc.message}})
            self._unavailable.add(allocation.id)
            self._observe(allocation.id, state="failed", exit_code=None, message=exc.message)
            if prepared and cid not in supervisor.supervised() and not await self._container_exists(cid):
                # Nothing runs on this root and nothing else would ever release it (its mount leaked).
                try:
                    await self.rootfs.release(cid)
                except CloudlessError as release_exc:
                    log.warning(
                        "agent.release_failed", extra={"fields": {"container": cid, "error": release_exc.message}}
                    )

    async def _container_exists(self, cid: str) -> bool:
        try:
            await self.runtime.inspect(cid)
        except ContainerNotFound:
            return False
        return True

    async def _remove(self, cid: str) -> None:
        supervisor = self.supervisor
        assert supervisor is not None
        alloc_id = cid
        try:
            spec = supervisor.status(cid).spec
            alloc_id = spec.labels.get(ALLOCATION_LABEL, cid)
        except CloudlessError:
            pass
        await supervisor.remove(cid, reason="no longer assigned to this node")
        try:
            await self.rootfs.release(cid)
        except CloudlessError as exc:
            log.warning("agent.release_failed", extra={"fields": {"container": cid, "error": exc.message}})
        if alloc_id in self.observed:
            obs = self.observed[alloc_id]
            self._observe(alloc_id, state="exited" if obs.state not in ("failed",) else obs.state)

    # ------------------------------------------------------------ observing

    def _observe(self, alloc_id: str, **fields) -> None:
        obs = self.observed.setdefault(alloc_id, Observed())
        for key, value in fields.items():
            setattr(obs, key, value)
        self._unreported.add(alloc_id)
        self._report_wake.set()

    async def _event_loop(self, events: trio.MemoryReceiveChannel) -> None:
        async for event in events:
            cid = event.id
            alloc_id = cid
            supervisor = self.supervisor
            if supervisor is not None:
                try:
                    alloc_id = supervisor.status(cid).spec.labels.get(ALLOCATION_LABEL, cid)
                except CloudlessError:
                    alloc_id = self._allocation_of(cid)
            if isinstance(event, sv.Started):
                health = "starting" if self._checked(alloc_id) else ""
                self._observe(
                    alloc_id, state="running", restarts=event.restart_count, exit_code=None, message="", health=health
                )
            elif isinstance(event, sv.Adopted):
                state = {"running": "running", "exited": "exited"}.get(event.status, "starting")
                self._observe(alloc_id, state=state)
            elif isinstance(event, sv.StartFailed):
                self._observe(alloc_id, state="starting", message=event.error)
            elif isinstance(event, sv.Exited):
                self._observe(alloc_id, state="exited", exit_code=event.exit_code, health="")
            elif isinstance(event, sv.Restarting):
                self._observe(alloc_id, state="starting", restarts=event.attempt)
            elif isinstance(event, sv.GaveUp):
                failed = event.exit_code != 0
                self._observe(
                    alloc_id,
                    state="failed" if failed else "exited",
                    exit_code=event.exit_code,
                    restarts=event.restart_count,
                )
            elif isinstance(event, sv.HealthChanged):
                self._observe(alloc_id, health=event.status)
            elif isinstance(event, sv.WatchFailed):
                self._observe(alloc_id, state="failed", message=event.error)
            elif isinstance(event, sv.Removed):
                if alloc_id in self.observed and self.observed[alloc_id].state not in ("failed", "exited"):
                    self._observe(alloc_id, state="exited")

    def _checked(self, alloc_id: str) -> bool:
        return any(a.allocation.id == alloc_id and a.spec.health_check is not None for a in self.assigned.items)

    def _allocation_of(self, cid: str) -> str:
        for a in self.assigned.items:
            if container_id(a.allocation.id) == cid:
                return a.allocation.id
        return cid

    # ------------------------------------------------------------ reporting

    async def _report_loop(self) -> None:
        delay = RECONNECT_INITIAL_S
        while True:
            await self._report_wake.wait()
            self._report_wake = trio.Event()
            await trio.sleep(REPORT_INTERVAL_S)  # batch what arrives together
            while self._unreported:
                if not self.connected:
                    break  # kept; the watch loop marks everything unreported on reconnection
                known = {a.allocation.id for a in self.assigned.items}
                ids = sorted(i for i in self._unreported if i in known)[:MAX_REPORTS_PER_BATCH]
                self._unreported -= set(self._unreported) - known  # reports for allocations the cluster dropped
                if not ids:
                    break
                batch = ReportBatch(self.node_id, tuple(self.observed[i].report(i) for i in ids))
                # Taken out before sending: what changes while the call is in flight is marked again.
                self._unreported -= set(ids)
                try:
                    await self.source.report(batch)
                except CloudlessError as exc:
                    self._unreported |= set(ids)
                    log.info("agent.report_failed", extra={"fields": {"error": str(exc), "reports": len(ids)}})
                    await trio.sleep(delay)
                    delay = min(RECONNECT_MAX_S, delay * 2)
                    continue
                delay = RECONNECT_INITIAL_S
            if self._unreported and self.connected:
                self._report_wake.set()

    # ------------------------------------------------------------ queries (logs, exec)

    def container_of(self, allocation_id: str) -> str:
        return container_id(allocation_id)
