"""Linearizable vars under every fault of the chaos harness, against real
`cloudless node` processes (issue 5 item 7; DESIGN.md §5-7).

Three nodes, each in its own network namespace on a bridge, form a cluster
(host 0 bootstraps, the others join with a token, autopilot makes all three
voters). Clients in the root namespace run the vars workload against random
nodes while one fault is in force, then the network is healed and killed
nodes restarted. After that every node must answer linearizable gets, and
the history plus those final reads must be linearizable
(VersionedRegisterModel: Raft's guarantee of linearizable reads via
ReadIndex, thesis §6.4, and at-most-once writes through client sessions,
§6.3). Every acknowledged write must still be there: no key's final modify
index is below an acknowledged write's index, and a final index equal to an
acknowledged write's index carries that write's value.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cloudless.testing.chaos import (
    ChaosCluster,
    Heal,
    Isolate,
    Kill9,
    Loss,
    OneWay,
    Partition,
    Restart,
    VarsWorkload,
    random_schedule,
)
from cloudless.testing.linearizability import VersionedRegisterModel, check_history

node_cluster = None


def _module():
    global node_cluster
    if node_cluster is None:
        import importlib.util
        import sys

        name = "chaos_node_cluster"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("node_cluster.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        node_cluster = sys.modules[name]
    return node_cluster


KEYS = ("k0", "k1", "k2")
SETTLE_S = 60.0  # heal → leader, 3 voters, all alive


def _workload(operate, duration_s: float, clients: int = 4) -> VarsWorkload:
    return VarsWorkload(
        operate=operate,
        clients=clients,
        keys=KEYS,
        duration_s=duration_s,
        max_ops=20_000,
        op_timeout_s=3.0,  # above NodeVars' op deadline, so operate decides the outcome
        think_s=0.01,
        backoff_s=0.1,
    )


async def run_scenario(tmp_path: Path, seed: int, schedule_of, duration_s: float, hosts: int = 3):
    """Bootstrap, run the workload under `schedule_of(nodes)`, heal, settle,
    read every key back through every node; assert linearizability and that
    acknowledged writes survived. Returns (result, nodes) for extra checks."""
    m = _module()
    async with ChaosCluster(hosts, tmp_path, m.node_spec(), seed=seed, extra={"join_flags": ""}) as cluster:
        nodes = m.NodeCluster(cluster)
        try:
            await nodes.bootstrap()
            vars_client = m.NodeVars(nodes)
            result = await cluster.run_workload(_workload(vars_client.operate, duration_s), schedule_of(nodes))
            t_end = trio.current_time()
            healthy = await nodes.wait_healthy(SETTLE_S)
            t0 = t_end - result.elapsed_s
            reads = await nodes.read_back(KEYS, t0, first_client=1_000_000)
            history = result.history + reads
            check = check_history(history, VersionedRegisterModel(), timeout_s=120)
            counts = result.counts()
            ok = sum(n for k, n in counts.items() if k.endswith(":ok"))
            unknown = sum(n for k, n in counts.items() if k.endswith(":unknown"))
            report = (
                f"seed={seed}: {ok} ok / {unknown} indeterminate / {result.not_applied} not applied; "
                f"attempts {vars_client.attempts}, retries {vars_client.retries}, "
                f"connect failures {vars_client.connect_failures}\n{result.summary()}\n{check.explanation}"
            )
            assert not check.timed_out, "checker timed out\n" + report
            assert check.linearizable, report
            assert healthy.leader, report
            # Every acknowledged write is still there after healing.
            acked = m.acknowledged_writes(result.history)
            for read in reads:
                writes = acked.get(read.key, [])
                if not writes:
                    continue
                top_index = max(i for i, _ in writes)
                assert read.output is not None, f"{read.key} lost: acknowledged writes {writes[-3:]}\n{report}"
                value, index = read.output
                assert index >= top_index, f"{read.key} at {index} < acknowledged {top_index}\n{report}"
                assert dict(writes).get(index, value) == value, f"{read.key}@{index} = {value!r}, acknowledged otherwise\n{report}"
            # The fault window really served some ops (the cluster was not simply down).
            assert ok > 50, report
            print(report)  # shown with -rP: the counts of a passing run
            return result, nodes, report
        finally:
            await nodes.aclose()


def _at(t: float, fault):
    return (t, fault)


FAULT_S = (2.0, 9.0)  # fault in force from 2 s to 9 s of a 12 s workload
DURATION_S = 12.0


def _minority_partition(nodes):
    return [_at(FAULT_S[0], Partition([[2], [0, 1]])), _at(FAULT_S[1], Heal())]


def _leader_isolated(nodes):
    return [_at(FAULT_S[0], Isolate(nodes.leader)), _at(FAULT_S[1], Heal())]


def _one_way(nodes):
    # The leader stops hearing host... rather: a follower's packets to the
    # leader are dropped, the leader's still arrive (asymmetric partition).
    async def follower(cluster):
        leader = await nodes.leader(cluster)
        return (leader + 1) % nodes.size

    return [_at(FAULT_S[0], OneWay(follower, nodes.leader)), _at(FAULT_S[1], Heal())]


def _loss(nodes):
    return [_at(FAULT_S[0], Loss(nodes.leader, 0.2, "both")), _at(FAULT_S[1], Heal())]


def _kill_leader_and_follower(nodes):
    async def follower(cluster):
        leader = await nodes.leader(cluster)
        return (leader + 1) % nodes.size

    return [
        _at(1.5, Kill9(nodes.leader)),
        _at(4.5, Restart()),
        _at(6.5, Kill9(follower)),
        _at(9.0, Restart()),
    ]


SCENARIOS = {
    "minority_partition": _minority_partition,
    "leader_isolated": _leader_isolated,
    "one_way": _one_way,
    "loss_20pct": _loss,
    "kill9_leader_then_follower": _kill_leader_and_follower,
}


@pytest.mark.root
@pytest.mark.parametrize("fault", list(SCENARIOS))
async def test_vars_stay_linearizable_and_acknowledged_writes_survive(tmp_path, fault):
    seed = 5_000 + list(SCENARIOS).index(fault)
    result, nodes, report = await run_scenario(tmp_path, seed, SCENARIOS[fault], DURATION_S)
    applied = [what for _, what in result.faults]
    assert len(applied) >= len(SCENARIOS[fault](nodes)), report
    if fault == "kill9_leader_then_follower":
        starts = [nodes.cluster.process(i).starts for i in range(nodes.size)]
        assert sorted(starts) == [1, 2, 2] or sorted(starts) == [1, 1, 3], f"{starts}\n{report}"


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
async def test_vars_stay_linearizable_under_a_random_schedule(tmp_path, seed):
    duration = float(os.environ.get("CLOUDLESS_CHAOS_NODE_S", "60"))

    def schedule(nodes):
        return random_schedule(seed, 3, duration - 2.0, leader=nodes.leader, fault_s=(1.0, 4.0), calm_s=(1.0, 3.0))

    await run_scenario(tmp_path, seed, schedule, duration)
