"""Scheduler decision latency and placement throughput on simulated heterogeneous clusters.

Prints one JSON object:
- per cluster size (1,000 and 5,000 nodes): `decision_p50_ms`, `decision_p95_ms`
  for placing one replica of a workload with constraints, affinities and a
  zone spread, `nodes_scored` (feasible nodes, every one scored) — the view
  is built once per cluster state, as the controller keeps it, and its build
  time is reported separately (`view_build_ms`);
- `placements_per_s` for 1,000-replica workloads onto 5,000 nodes, scheduler
  only (no Raft): median over several workloads, each placed in one plan.

Run: .venv/bin/python benchmarks/scheduler.py [--quick]
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cloudless.scheduler import ClusterView, NodeInfo, plan_placements
from cloudless.state.workload import (
    Affinity,
    Allocation,
    Constraint,
    Resources,
    Spread,
    WorkloadSpec,
    validate,
)

GiB = 1 << 30
REGIONS = ("eu-west", "eu-central", "us-east", "ap-south")
CLASSES = (  # class, share, cpu millis choices, memory GiB choices, arch weights
    ("server", 0.2, (8000, 16000, 32000), (16, 32, 64), ("amd64",) * 9 + ("arm64",)),
    ("pc", 0.3, (4000, 8000, 12000), (8, 16, 32), ("amd64",)),
    ("laptop", 0.25, (4000, 8000), (8, 16), ("amd64",) * 3 + ("arm64",)),
    ("phone", 0.15, (4000, 8000), (4, 6, 8), ("arm64",)),
    ("gateway", 0.1, (1000, 2000, 4000), (1, 2, 4), ("arm64",) * 2 + ("armv7",)),
)


def make_nodes(n: int, rng: random.Random) -> list[NodeInfo]:
    nodes = []
    shares = [c[1] for c in CLASSES]
    for k in range(n):
        cls, _, cpus, mems, arches = rng.choices(CLASSES, weights=shares)[0]
        region = rng.choice(REGIONS)
        zone = f"{region}-{rng.choice('abc')}"
        battery = cls in ("laptop", "phone")
        on_battery = battery and rng.random() < (0.3 if cls == "laptop" else 0.7)
        network = "wired" if cls in ("server", "pc", "gateway") else rng.choice(("wifi", "wifi", "cellular"))
        labels = {"rack": f"r{rng.randrange(40)}"} if cls == "server" else {}
        if cls == "server" and rng.random() < 0.6:
            labels["cost"] = f"{rng.choice((0.02, 0.05, 0.1, 0.4)):.2f}"
        if rng.random() < 0.05:
            labels["gpu"] = rng.choice(("nvidia", "amd"))
        state = "alive" if rng.random() < 0.97 else rng.choice(("suspect", "dead"))
        nodes.append(
            NodeInfo(
                node_id=f"node-{k:05d}",
                state=state,
                eligible=rng.random() < 0.99,
                region=region,
                zone=zone,
                arch=rng.choice(arches),
                device_class=cls,
                labels=labels,
                cpu_millis=rng.choice(cpus),
                memory_bytes=rng.choice(mems) * GiB,
                power="battery" if on_battery else "ac",
                battery_percent=rng.randrange(5, 101) if battery else None,
                charging=battery and not on_battery,
                network=network,
                metered=network == "cellular",
                uptime_s=rng.expovariate(1 / 86400),
                flaps=rng.choice((0, 0, 0, 0, 1, 2, 5)),
            )
        )
    return nodes


def background_allocations(nodes: list[NodeInfo], rng: random.Random) -> list[Allocation]:
    """Other workloads already running: about half of the nodes fairly busy."""
    out = []
    for k, node in enumerate(nodes):
        for r in range(rng.choice((0, 0, 1, 2, 3))):
            cpu = min(node.cpu_millis // 4, rng.choice((250, 500, 1000)))
            mem = min(node.memory_bytes // 4, rng.choice((256, 512, 1024)) << 20)
            out.append(
                Allocation(
                    id=f"bg-{k}-{r}",
                    workload=f"bg{rng.randrange(50)}",
                    version=0,
                    node=node.node_id,
                    replica=r,
                    state="running",
                    resources=Resources(cpu_millis=max(1, cpu), memory_bytes=max(1 << 20, mem)),
                )
            )
    return out


def decision_specs(rng: random.Random, count: int) -> list[WorkloadSpec]:
    shapes = [
        dict(
            constraints=(Constraint("node.class", "not_in", ("phone", "gateway")),),
            affinities=(Affinity("node.power", "=", "ac", 50),),
            spreads=(Spread("node.zone"),),
        ),
        dict(
            constraints=(Constraint("node.region", "=", "eu-west"), Constraint("node.arch", "=", "amd64")),
            spreads=(Spread("node.zone", max_per=5),),
        ),
        dict(
            constraints=(Constraint("node.arch", "in", ("amd64", "arm64")),),
            affinities=(Affinity("node.class", "=", "server", 40), Affinity("label.gpu", "exists", "", -20)),
        ),
        dict(
            constraints=(Constraint("node.network", "!=", "cellular"), Constraint("node.region", "regex", "^eu-")),
            spreads=(Spread("node.region"), Spread("node", max_per=1)),
        ),
        dict(),
    ]
    specs = []
    for k in range(count):
        shape = shapes[k % len(shapes)]
        specs.append(
            validate(
                WorkloadSpec(
                    name=f"svc-{k}",
                    image="registry.local/app:1",
                    replicas=rng.choice((1, 3, 5)),
                    resources=Resources(
                        cpu_millis=rng.choice((100, 250, 500)), memory_bytes=rng.choice((128, 256, 512)) << 20
                    ),
                    **shape,
                )
            )
        )
    return specs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def bench_decisions(n: int, decisions: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    nodes = make_nodes(n, rng)
    allocations = background_allocations(nodes, rng)
    t0 = time.perf_counter()
    view = ClusterView(nodes, allocations)
    build_ms = (time.perf_counter() - t0) * 1000
    specs = decision_specs(rng, decisions)
    # Warm the view's memoised per-attribute indexes, as a long-lived controller view would be.
    for spec in specs[:5]:
        plan_placements(spec, 1, view)
    times, cpu_times, scored = [], [], []
    for spec in specs:
        c0 = time.process_time()
        t0 = time.perf_counter()
        plan = plan_placements(spec, 1, view)
        times.append((time.perf_counter() - t0) * 1000)
        cpu_times.append((time.process_time() - c0) * 1000)
        scored.append(plan.placements[0].feasible if plan.placements else 0)
    cold = ClusterView(nodes, allocations)
    t0 = time.perf_counter()
    plan_placements(specs[0], 1, cold)
    cold_ms = (time.perf_counter() - t0) * 1000
    return {
        "nodes": n,
        "decisions": decisions,
        "decision_p50_ms": round(statistics.median(times), 3),
        "decision_p95_ms": round(percentile(times, 95), 3),
        "decision_max_ms": round(max(times), 3),
        # CPU time of this process: the same decisions without the wall-clock
        # noise of other processes sharing the machine's cores.
        "decision_cpu_p50_ms": round(statistics.median(cpu_times), 3),
        "decision_cpu_p95_ms": round(percentile(cpu_times, 95), 3),
        "nodes_scored": int(statistics.median(scored)),
        "nodes_scored_min": min(scored),
        "nodes_scored_max": max(scored),
        "background_allocations": len(allocations),
        "view_build_ms": round(build_ms, 1),
        "first_decision_on_new_view_ms": round(cold_ms, 1),
    }


def bench_throughput(n: int, replicas: int, workloads: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    nodes = make_nodes(n, rng)
    view = ClusterView(nodes, background_allocations(nodes, rng))
    rates, placed_counts, with_update = [], [], []
    for k in range(workloads):
        spec = validate(
            WorkloadSpec(
                name=f"c1m-{k}",
                image="registry.local/app:1",
                replicas=replicas,
                resources=Resources(cpu_millis=100, memory_bytes=128 << 20),
                constraints=(Constraint("node.class", "!=", "gateway"),) if k % 2 else (),
                spreads=(Spread("node.zone"),) if k % 2 == 0 else (),
            )
        )
        t0 = time.perf_counter()
        plan = plan_placements(spec, replicas, view)
        elapsed = time.perf_counter() - t0
        rates.append(len(plan.placements) / elapsed)
        placed_counts.append(len(plan.placements))
        # Commit the plan into the next snapshot, as the controller would after Raft.
        view = view.with_allocations(
            Allocation(
                id=f"{spec.name}-{p.replica}",
                workload=spec.name,
                version=0,
                node=p.node,
                replica=p.replica,
                resources=spec.resources,
            )
            for p in plan.placements
        )
        with_update.append(len(plan.placements) / (time.perf_counter() - t0))
    return {
        "nodes": n,
        "replicas_per_workload": replicas,
        "workloads": workloads,
        "placements_per_s": round(statistics.median(rates)),
        "placements_per_s_min": round(min(rates)),
        "placements_per_s_including_view_update": round(statistics.median(with_update)),
        "placed_per_workload_min": min(placed_counts),
    }


def main() -> None:
    quick = "--quick" in sys.argv
    decisions = 60 if quick else 300
    result = {
        "benchmark": "scheduler",
        "decision": [bench_decisions(1000, decisions, seed=1), bench_decisions(5000, decisions, seed=2)],
        "throughput": bench_throughput(5000, 1000, 4 if quick else 10, seed=3),
        "targets": {"decision_p50_ms": 5, "decision_p95_ms": 15, "placements_per_s": 5000},
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
