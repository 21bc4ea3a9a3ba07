"""Reschedule latency on a real local cluster: `kill -9` of a node → its
replicas running elsewhere.

Starts a 5-node dev cluster on loopback (needs root and runc), imports a
busybox image on every node, runs a 5-replica workload, then per trial:
SIGKILLs a node (not the leader) that holds replicas, and measures until
(a) the controller marked them lost and (b) replacements report running on
other nodes. The node is then restarted and the cluster settles (its stale
containers stopped by its agent) before the next trial.

    .venv/bin/python benchmarks/reschedule.py [--trials 10] [--nodes 5] [--replicas 5]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from cloudless.api import client_config
from cloudless.api.client import ClusterClient
from cloudless.api.messages import StatusReply, StatusRequest
from cloudless.api.workloads import InspectReply, RunWorkload, WorkloadRef, WorkloadReply
from cloudless.state.workload import from_flags

POLL_S = 0.05


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def cloudless(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cloudless", *args], capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise SystemExit(f"cloudless {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def start_node(node_dir: Path, address: str) -> int:
    with open(node_dir / "node.out", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloudless",
                "node",
                "--data-dir",
                str(node_dir),
                "--listen",
                address,
                "--voter-stabilization",
                "2",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (node_dir / "node.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def live(reply: InspectReply) -> list:
    return [a for a in reply.allocations if a.desired == "run" and a.state == "running"]


async def inspect(client: ClusterClient) -> InspectReply:
    return await client.call("workloads.inspect", WorkloadRef("bench"), response=InspectReply, timeout=5.0)


async def wait_for(what: str, predicate, timeout: float = 90.0):
    deadline = trio.current_time() + timeout
    last = None
    while trio.current_time() < deadline:
        try:
            last = await predicate()
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        await trio.sleep(POLL_S)
    raise SystemExit(f"timed out waiting for {what}: {last}")


async def bench(directory: Path, nodes: list[dict], trials: int, replicas: int) -> dict:
    context = client_config.load(directory / "config.yaml").context()
    client = ClusterClient(context, timeout=5.0)
    spec = from_flags(
        "busybox:latest",
        name="bench",
        replicas=replicas,
        memory="16Mi",
        cpu="50m",
        command=("sh", "-c", "while true; do sleep 1; done"),
    )
    await client.call(
        "workloads.run", RunWorkload(spec, True, client.client_id, client.next_seq()), response=WorkloadReply
    )

    async def all_running():
        r = await inspect(client)
        return r if len(live(r)) == replicas else None

    await wait_for("all replicas running", all_running)
    rng = random.Random(1)
    detect_s: list[float] = []
    heal_s: list[float] = []
    moved = 0
    by_name = {n["name"]: n for n in nodes}
    for trial in range(trials):
        status = await client.call("status", StatusRequest(), response=StatusReply)
        reply = await inspect(client)
        holders = sorted({a.node for a in live(reply)} - {status.leader})
        victim = rng.choice(holders)
        victims = {a.id for a in live(reply) if a.node == victim}
        pid = int((Path(by_name[victim]["dir"]) / "node.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        t0 = trio.current_time()
        detected = None
        while True:
            try:
                r = await inspect(client)
            except Exception:
                await trio.sleep(POLL_S)
                continue
            now = trio.current_time()
            states = {a.id: a.state for a in r.allocations}
            if detected is None and all(states.get(v) == "lost" for v in victims):
                detected = now - t0
            if len([a for a in live(r) if a.node != victim]) == replicas:
                heal_s.append(now - t0)
                detect_s.append(detected if detected is not None else now - t0)
                moved += len(victims)
                break
            if now - t0 > 120:
                raise SystemExit(f"trial {trial}: replicas of {victim} not replaced within 120 s")
            await trio.sleep(POLL_S)
        # Bring the node back and let its agent stop what was replaced.
        start_node(Path(by_name[victim]["dir"]), by_name[victim]["address"])
        containers = Path(by_name[victim]["dir"]) / "agent" / "sandbox" / "containers"

        async def settled():
            s = await client.call("status", StatusRequest(), response=StatusReply)
            alive = all(m.state == "alive" for m in s.members)
            stale = containers.exists() and any(p.name in victims for p in containers.iterdir())
            r = await inspect(client)
            return alive and not stale and len(live(r)) == replicas

        await wait_for(f"{victim} back and settled", settled)
        await trio.sleep(1.0)
    final_nodes = sorted(a.node for a in live(await inspect(client)))
    await client.call(
        "workloads.stop", WorkloadRef("bench", client.client_id, client.next_seq()), response=WorkloadReply
    )

    async def stopped():
        r = await inspect(client)
        return all(a.state in ("exited", "failed", "lost") for a in r.allocations if a.desired == "stop")

    await wait_for("stop", stopped, timeout=60)
    await client.aclose()
    return {
        "reschedule_p50_s": round(statistics.median(heal_s), 3),
        "reschedule_p95_s": round(percentile(heal_s, 0.95), 3),
        "reschedule_max_s": round(max(heal_s), 3),
        "lost_detected_p50_s": round(statistics.median(detect_s), 3),
        "lost_detected_p95_s": round(percentile(detect_s, 0.95), 3),
        "trials": trials,
        "replicas_moved": moved,
        "samples_s": [round(x, 3) for x in heal_s],
        "final_nodes": final_nodes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("runc") is None:
        raise SystemExit("reschedule benchmark: needs root and runc")
    work = Path(tempfile.mkdtemp(prefix="cloudless-reschedule-"))
    directory = work / "cluster"
    try:
        base = 21000 + random.randrange(0, 20000)
        up = json.loads(
            cloudless(
                "dev", "up", "--nodes", str(args.nodes), "--dir", str(directory), "--base-port", str(base), "--json"
            )
        )
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from pathlib import Path; from cloudless.sandbox.imagebuild import build_busybox_image; build_busybox_image(Path({str(work / 'image')!r}), 'layout')",
            ],
            check=True,
            timeout=60,
        )
        for node in up["nodes"]:
            cloudless(
                "image",
                "import",
                str(work / "image" / "layout"),
                "--name",
                "busybox:latest",
                "--data-dir",
                node["dir"],
                "--json",
            )
        figures = trio.run(bench, directory, up["nodes"], args.trials, args.replicas)
    except BaseException:
        keep = True
        raise
    else:
        keep = False
    finally:
        subprocess.run(
            [sys.executable, "-m", "cloudless", "stop", "bench", "--config", str(directory / "config.yaml")],
            capture_output=True,
            timeout=60,
        )
        containers = list(directory.glob("node*/agent/sandbox/containers"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(c.exists() and any(c.iterdir()) for c in containers):
            time.sleep(0.3)
        subprocess.run(
            [sys.executable, "-m", "cloudless", "dev", "down", "--dir", str(directory)], capture_output=True, timeout=60
        )
        if keep:
            print(f"reschedule benchmark failed; node logs kept in {directory}/node*/node.out", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "reschedule",
                **figures,
                "targets": {"reschedule_p50_s": 2.0, "reschedule_p95_s": 4.0},
                "workload": {
                    "nodes": args.nodes,
                    "replicas": args.replicas,
                    "runtime": "runc",
                    "image": "busybox (local)",
                },
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
