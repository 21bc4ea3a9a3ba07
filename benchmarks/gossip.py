"""Gossip membership figures: simulated 1,000 / 5,000 members, and a real loopback cluster.

Prints one JSON object:
- per size and loss (0 %, 1 %, 10 %): crash detection (first member / all
  members, p50 and p95 over the crashes), join known by all (p95), false
  positives, bytes per member per second (sealed UDP payload + push-pull
  stream bytes);
- per size, 5 % of members stalling 2 s every 10 s under 5 % loss, Lifeguard
  on versus off in the same run: false positives split into healthy members
  and stalled members, with the detection times they came with;
- small clusters (5, 20, 50 members), many seeds pooled: crash detection
  with early confirmations on and off in the same run (members that hear a
  suspicion probe the suspect at once), with healthy false positives under
  10 % loss;
- CPU of one real member idling in a 50-member cluster on loopback UDP
  (sealed packets, trio drivers, all in this process; CPU / 50).

Usage: .venv/bin/python benchmarks/gossip.py [--sizes 1000,5000] [--seed 1] [--duration 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import trio

from cloudless.errors import Unavailable
from cloudless.gossip.core import GossipConfig, GossipCore
from cloudless.gossip.driver import GossipDriver, format_addr
from cloudless.gossip.keyring import Keyring, PacketSealer
from cloudless.gossip.members import ALIVE
from cloudless.testing.gossip_sim import SimConfig, simulate
from cloudless.transport.udp import UdpEndpoint


def scenario(nodes: int, loss: float, seed: int, duration: float, **extra) -> dict:
    kills = max(5, nodes // 250)
    started = time.process_time()
    result = simulate(
        SimConfig(nodes=nodes, seed=seed, duration=duration, loss=loss, kills=kills, joins=kills, **extra)
    )
    doc = result.summary()
    doc.update(
        loss=loss,
        kills=kills,
        joins=kills,
        false_positives_healthy=len(result.false_positive_members) - result.false_positives_stalled,
        kbit_per_node_s=round(result.bytes_per_node_s * 8 / 1000, 1),
        packets=result.packets,
        sim_cpu_s=round(time.process_time() - started, 1),
    )
    print(f"# {nodes} members loss={loss} {extra}: {doc}", file=sys.stderr, flush=True)
    return doc


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 3)


def small_clusters(sizes: list[int], seeds: int, duration: float) -> dict:
    """Detection where Cloudless clusters mostly are (a handful of devices):
    pooled over `seeds` runs, early confirmations on vs off, same seeds."""
    out: dict = {}
    for n in sizes:
        for loss in (0.0, 0.10):
            row: dict = {}
            for early in (True, False):
                detect: list[float] = []
                undetected = healthy_fp = 0
                for seed in range(1, seeds + 1):
                    r = simulate(
                        SimConfig(
                            nodes=n,
                            seed=seed,
                            duration=duration,
                            loss=loss,
                            kills=3,
                            joins=2,
                            gossip=GossipConfig(early_confirmations=early),
                        )
                    )
                    detect += [t for t in r.detect_all if t is not None]
                    undetected += r.undetected
                    healthy_fp += len(r.false_positive_members) - r.false_positives_stalled
                row["early_on" if early else "early_off"] = {
                    "crashes": len(detect) + undetected,
                    "detect_all_p50_s": _pct(detect, 0.5),
                    "detect_all_p95_s": _pct(detect, 0.95),
                    "undetected": undetected,
                    "false_positives_healthy": healthy_fp,
                }
            on, off = row["early_on"], row["early_off"]
            if on["detect_all_p50_s"] and off["detect_all_p50_s"]:
                row["p50_ratio_on_over_off"] = round(on["detect_all_p50_s"] / off["detect_all_p50_s"], 2)
            print(f"# small {n} members loss={loss}: {row}", file=sys.stderr, flush=True)
            out[f"{n}@{loss}"] = row
    return out


async def idle_cluster(members: int = 50, settle: float = 8.0, window: float = 20.0) -> dict:
    registry: dict[str, GossipDriver] = {}
    key = os.urandom(32)
    endpoints: list[UdpEndpoint] = []

    async def stream_exchange(addr: str, request: bytes) -> bytes:
        peer = registry.get(addr)
        if peer is None:
            raise Unavailable("no such member", peer=addr)
        return await peer.serve_stream(request)

    async with trio.open_nursery() as nursery:
        drivers = []
        for i in range(members):
            endpoint = UdpEndpoint("127.0.0.1", 0)
            addr = await nursery.start(endpoint.run)
            core = GossipCore(
                f"m{i}", format_addr(addr), rng=random.Random(i), now=trio.current_time(), config=GossipConfig()
            )
            driver = GossipDriver(core, endpoint, PacketSealer(Keyring(key)), stream_exchange)
            await nursery.start(driver.run)
            registry[core.addr] = driver
            drivers.append(driver)
            endpoints.append(endpoint)
        for d in drivers[1:]:
            await d.join([drivers[0].core.addr])
        names = [d.core.name for d in drivers]
        with trio.move_on_after(30):
            while not all(
                d.core.member(n) is not None and d.core.member(n).state == ALIVE for d in drivers for n in names
            ):
                await trio.sleep(0.1)
        await trio.sleep(settle)
        sent0 = sum(e.statistics().bytes_sent for e in endpoints)
        suspected0 = sum(d.core.stats["suspected"] for d in drivers)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await trio.sleep(window)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        sent = sum(e.statistics().bytes_sent for e in endpoints) - sent0
        converged = all(d.core.member(n).state == ALIVE for d in drivers for n in names)
        suspected = sum(d.core.stats["suspected"] for d in drivers) - suspected0
        nursery.cancel_scope.cancel()
    return {
        "members": members,
        "window_s": window,
        "cpu_percent_of_one_core_per_member": round(100.0 * cpu / wall / members, 3),
        "cpu_ms_per_member_per_s": round(1000.0 * cpu / wall / members, 3),
        "udp_bytes_per_member_s": round(sent / wall / members, 1),
        "all_alive_at_end": converged,
        "suspicions_during_window": suspected,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--parts", default="loss,stalls,small,real", help="any of loss, stalls, small, real")
    parser.add_argument("--small-sizes", default="5,20,50")
    parser.add_argument("--small-seeds", type=int, default=20)
    parser.add_argument("--stall-modes", default="on,off", help="Lifeguard modes for the stall scenario")
    parser.add_argument("--stall-duration", type=float, default=None, help="virtual seconds for stall runs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    cfg = GossipConfig()
    out: dict = {
        "benchmark": "gossip",
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "workload": {
            "sizes": sizes,
            "seed": args.seed,
            "virtual_seconds": args.duration,
            "crashes_and_joins": "max(5, n/250) each, spread over the run",
            "latency_s": [0.001, 0.010],
            "protocol": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "bytes_counted": "sealed UDP payload (plaintext + 49 B seal) + push-pull stream bytes; no IP/UDP headers",
        },
        "targets_at_5000_1pct": {
            "detect_all_p50_s": 3.0,
            "detect_all_p95_s": 6.0,
            "join_all_p95_s": 2.0,
            "stall_false_positive_ratio_off_over_on": 50,
            "kbit_per_node_s": 50,
        },
        "loss": {},
        "stalls": {},
    }
    for n in sizes if "loss" in parts else ():
        out["loss"][str(n)] = [scenario(n, loss, args.seed, args.duration) for loss in (0.0, 0.01, 0.10)]
    stall_duration = args.stall_duration or args.duration
    for n in sizes if "stalls" in parts else ():
        runs = {
            mode: scenario(n, 0.05, args.seed, stall_duration, stall_fraction=0.05, lifeguard=mode == "on")
            for mode in args.stall_modes.split(",")
        }
        on, off = runs.get("on"), runs.get("off")
        if on and off:
            runs["healthy_false_positive_ratio_off_over_on"] = (
                None
                if on["false_positives_healthy"] == 0
                else round(off["false_positives_healthy"] / on["false_positives_healthy"], 1)
            )
        out["stalls"][str(n)] = runs
    if "small" in parts:
        out["small"] = small_clusters([int(x) for x in args.small_sizes.split(",") if x], args.small_seeds, 40.0)
    if "real" in parts:
        out["real_idle_50"] = trio.run(idle_cluster)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
