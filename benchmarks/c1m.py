"""C1M-style placement throughput through the real controller and real Raft.

Three Raft drivers in this process, each over its own RocksDB log in a temp
dir (fsync on every batch), exchange messages in memory; the leader's
state machine is the real `cloudless.state.fsm.StateMachine`. Workloads of
1,000 replicas are submitted through Raft; the real controller core
(`coordinator.controller.reconcile`) plans against 5,000 simulated
heterogeneous nodes (benchmarks/scheduler.py's generator), and each plan is
committed through Raft as one `CommitPlan` entry, as on the leader. Then
simulated agents report every placed allocation running, in per-node
batches, through Raft as well.

Prints one JSON object: placements committed per second (submit → every
allocation of the workload committed), and with the agents' reports.
Nomad's C1M reached 3,750 placements/s with 5 servers; target ≥ 5,000.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler import make_nodes

from cloudless.coordinator.controller import ControllerState, reconcile
from cloudless.raft.core import RaftConfig, RaftNode, Role
from cloudless.raft.driver import RaftDriver
from cloudless.raft.messages import Entry, EntryKind
from cloudless.raft.rocks import RocksStorage
from cloudless.raft.storage import bootstrap_log
from cloudless.state.commands import (
    AllocationReport,
    Proposal,
    ReportAllocations,
    SubmitWorkload,
    encode_proposal,
)
from cloudless.state.fsm import StateMachine
from cloudless.state.workload import Resources, WorkloadSpec, validate

IDS = ("s1", "s2", "s3")


class InProcessRaft:
    def __init__(self, root: Path) -> None:
        self.drivers: dict[str, RaftDriver] = {}
        self.fsm: dict[str, StateMachine] = {}
        self.storages = {}
        for node_id in IDS:
            storage = RocksStorage(root / node_id)
            bootstrap_log(storage, IDS)
            self.storages[node_id] = storage

    async def start(self, nursery: trio.Nursery) -> None:
        for node_id in IDS:
            fsm = self.fsm[node_id] = StateMachine()

            async def apply(entries: list[Entry], fsm=fsm) -> None:
                for e in entries:
                    fsm.apply(e.index, e.data if e.kind == EntryKind.NORMAL else b"")

            def send(message) -> None:
                peer = self.drivers.get(message.to)
                if peer is not None:
                    peer.deliver(message)

            node = RaftNode(
                RaftConfig(id=node_id, election_tick=10, heartbeat_tick=2),
                self.storages[node_id],
                random.Random(node_id),
            )
            driver = self.drivers[node_id] = RaftDriver(node, self.storages[node_id], send, apply, tick_interval=0.05)
            await nursery.start(driver.run)

    async def leader(self) -> tuple[RaftDriver, StateMachine]:
        with trio.fail_after(10):
            while True:
                for node_id, driver in self.drivers.items():
                    if driver.node.role is Role.LEADER:
                        return driver, self.fsm[node_id]
                await trio.sleep(0.05)

    def close(self) -> None:
        for storage in self.storages.values():
            storage.close()


def proposal(command) -> bytes:
    return encode_proposal(Proposal(command=command, now=time.time()))


async def run(args) -> dict:
    rng = random.Random(args.seed)
    nodes = make_nodes(args.nodes, rng)
    results = []
    with tempfile.TemporaryDirectory(prefix="c1m-") as tmp:
        raft = InProcessRaft(Path(tmp))
        try:
            async with trio.open_nursery() as nursery:
                await raft.start(nursery)
                leader, fsm = await raft.leader()
                for k in range(args.workloads):
                    spec = validate(
                        WorkloadSpec(
                            name=f"c1m-{k}",
                            image="registry.local/app:1",
                            replicas=args.replicas,
                            resources=Resources(cpu_millis=100, memory_bytes=128 << 20),
                        )
                    )
                    t0 = time.perf_counter()
                    await leader.propose(proposal(SubmitWorkload(spec)), timeout=30)
                    rounds = 0
                    plan_s = 0.0
                    while True:
                        state = ControllerState(fsm.workloads, fsm.allocations, nodes)
                        t_plan = time.perf_counter()
                        decision = reconcile(state, time.time(), random.Random(rounds), view=None)
                        plan_s += time.perf_counter() - t_plan
                        rounds += 1
                        if decision.plan is None or not decision.plan.create:
                            break
                        await leader.propose(proposal(decision.plan), timeout=60)
                    placed = [a for a in fsm.allocations.values() if a.allocation.workload == spec.name]
                    committed_s = time.perf_counter() - t0
                    # Simulated agents: every node reports its replicas running, one batch per node.
                    by_node = defaultdict(list)
                    for rec in placed:
                        by_node[rec.allocation.node].append(AllocationReport(rec.allocation.id, "running"))
                    t_rep = time.perf_counter()
                    async with trio.open_nursery() as reporters:
                        for node_id, reports in by_node.items():
                            reporters.start_soon(
                                leader.propose, proposal(ReportAllocations(node_id, tuple(reports))), 60
                            )
                    running_s = time.perf_counter() - t0
                    running = sum(
                        1
                        for a in fsm.allocations.values()
                        if a.allocation.workload == spec.name and a.allocation.state == "running"
                    )
                    results.append(
                        {
                            "placed": len(placed),
                            "running": running,
                            "rounds": rounds,
                            "plan_cpu_s": round(plan_s, 3),
                            "committed_s": round(committed_s, 3),
                            "reports_s": round(time.perf_counter() - t_rep, 3),
                            "placements_per_s": round(len(placed) / committed_s),
                            "running_per_s": round(running / running_s),
                        }
                    )
                    print(f"workload {k}: {results[-1]}", file=sys.stderr)
                nursery.cancel_scope.cancel()
        finally:
            raft.close()
    return {
        "benchmark": "c1m",
        "workload": {
            "nodes": args.nodes,
            "replicas_per_workload": args.replicas,
            "workloads": args.workloads,
            "raft": "3 in-process RaftDrivers, RocksDB logs with fsync, in-memory messages; real StateMachine and controller core",
            "agents": "simulated: one ReportAllocations batch per node through Raft",
        },
        "placements_per_s": round(statistics.median(r["placements_per_s"] for r in results)),
        "placements_per_s_min": min(r["placements_per_s"] for r in results),
        "running_per_s": round(statistics.median(r["running_per_s"] for r in results)),
        "target_placements_per_s": 5000,
        "nomad_c1m_placements_per_s": 3750,
        "per_workload": results,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--workloads", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(trio.run(run, args)))


if __name__ == "__main__":
    main()
