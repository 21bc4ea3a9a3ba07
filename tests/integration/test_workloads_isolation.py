"""Disconnected mode on real nodes in network namespaces (cloudless/testing
netns + chaos harness), iptables cutting one host off:

- the isolated node keeps its replica running while the cluster declares it
  dead and replaces the replica elsewhere;
- restarted while still isolated (node process killed, its containers gone as
  after a reboot), its agent brings the replica back from local state without
  reaching any coordinator;
- after the partition heals, exactly the desired number of replicas remains.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from cloudless.agent.teardown import remove_node_sandbox
from cloudless.api.workloads import InspectReply, RunWorkload, WorkloadRef, WorkloadReply
from cloudless.errors import CloudlessError
from cloudless.sandbox.rootfs import mounts_under
from cloudless.state.workload import from_flags
from tests.harness.chaos import ChaosCluster

pytestmark = [pytest.mark.root, pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")]

REPLICAS = 3


def _node_cluster():
    import importlib.util

    name = "chaos_node_cluster"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "chaos" / "node_cluster.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def running_containers(data_dir: Path) -> set[str]:
    out = subprocess.run(
        ["runc", "--root", str(data_dir / "agent" / "sandbox" / "runc"), "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return {c["id"] for c in json.loads(out.stdout or "null") or [] if c["status"] == "running"}


@asynccontextmanager
async def sandboxes_removed_afterwards(data: dict[int, Path]):
    """Once the nodes are gone, whatever their agents did not get to (a failure midway) is removed."""
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            for d in data.values():
                await remove_node_sandbox(d)


def containers_dir(data_dir: Path) -> Path:
    return data_dir / "agent" / "sandbox" / "containers"


def live(reply: InspectReply) -> list:
    return [a for a in reply.allocations if a.desired == "run" and a.state == "running"]


async def eventually(what: str, predicate, timeout_s: float = 60.0):
    last = None
    with trio.move_on_after(timeout_s):
        while True:
            try:
                last = await predicate()
            except CloudlessError as exc:
                last = exc
            else:
                if last:
                    return last
            await trio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


async def test_isolated_node_keeps_its_replica_restarts_it_while_isolated_and_no_duplicate_survives(tmp_path):
    nc_module = _node_cluster()
    image = tmp_path / "image"
    await trio.run_process(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from cloudless.sandbox.imagebuild import build_busybox_image; build_busybox_image(Path({str(image)!r}), 'layout')",
        ]
    )
    # `ip netns exec` also gives the process a mount namespace whose /sys has no
    # cgroup mounts, which runc needs: go back to this process's mount
    # namespace and keep only the host's network namespace.
    base = nc_module.node_spec()
    spec = dataclasses.replace(base, argv=["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", *base.argv])
    data: dict[int, Path] = {}
    async with sandboxes_removed_afterwards(data), ChaosCluster(3, tmp_path / "run", spec, seed=8) as cluster:
        nodes = nc_module.NodeCluster(cluster)
        await nodes.bootstrap()
        data.update({i: cluster.process(i).data_dir for i in range(3)})
        for i in range(3):
            await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "cloudless",
                    "image",
                    "import",
                    str(image / "layout"),
                    "--name",
                    "busybox:latest",
                    "--data-dir",
                    str(data[i]),
                    "--json",
                ],
                capture_stdout=True,
            )
        client = nodes.client(0, timeout=5.0)
        clients = [client]
        try:
            workload = from_flags(
                "busybox:latest",
                name="island",
                replicas=REPLICAS,
                memory="16Mi",
                command=("sh", "-c", "while true; do sleep 1; done"),
            )
            await client.call(
                "workloads.run",
                RunWorkload(workload, True, client.client_id, client.next_seq()),
                response=WorkloadReply,
            )

            async def inspect() -> InspectReply:
                # Through any host that answers (the isolated one cannot reach the leader).
                for c in clients:
                    try:
                        return await c.call("workloads.inspect", WorkloadRef("island"), response=InspectReply)
                    except CloudlessError:
                        continue
                raise CloudlessError("no host answered inspect")

            async def all_running():
                r = await inspect()
                return r if len(live(r)) == REPLICAS else None

            reply = await eventually("3 running replicas", all_running)
            leader = nc_module.host_index((await nodes.status(0)).leader)
            clients[:] = [nodes.client(i, timeout=5.0) for i in range(3) if i != 0] + [client]
            victim_alloc = next(a for a in live(reply) if nc_module.host_index(a.node) != leader)
            victim = nc_module.host_index(victim_alloc.node)
            clients[:] = [nodes.client(i, timeout=5.0) for i in range(3) if i != victim]

            # Cut off: the cluster replaces the replica; the node keeps running its copy.
            await cluster.isolate(victim)

            async def replaced():
                r = await inspect()
                states = {a.id: a.state for a in r.allocations}
                others = [a for a in live(r) if a.node != victim_alloc.node]
                return r if states.get(victim_alloc.id) == "lost" and len(others) == REPLICAS else None

            await eventually("the isolated node's replica replaced elsewhere", replaced)
            assert victim_alloc.id in running_containers(data[victim])  # still running over there

            # Rebooted while isolated: node process and containers gone, then the node starts alone.
            await cluster.kill9(victim)
            with trio.fail_after(30):
                await trio.run_process(
                    [
                        "runc",
                        "--root",
                        str(data[victim] / "agent" / "sandbox" / "runc"),
                        "kill",
                        victim_alloc.id,
                        "KILL",
                    ],
                    check=False,
                )

            async def dead():
                return victim_alloc.id not in running_containers(data[victim])

            await eventually("its container dead", dead, timeout_s=30)
            await cluster.restart(victim)

            async def back():
                return victim_alloc.id in running_containers(data[victim])

            await eventually("the replica restarted from local state, no coordinator reachable", back)

            # Healed: the returning node learns its replica was replaced and stops it.
            await cluster.heal()

            async def reconciled():
                r = await inspect()
                everywhere = [cid for d in data.values() for cid in running_containers(d) if cid.startswith("island-")]
                return (r, everywhere) if len(live(r)) == REPLICAS and len(everywhere) == REPLICAS else None

            reply, everywhere = await eventually("exactly 3 replicas after the heal", reconciled, timeout_s=90)
            assert victim_alloc.id not in everywhere
            assert sorted(a.replica for a in live(reply)) == list(range(REPLICAS))
            await trio.sleep(3)  # and it stays that way
            everywhere = [cid for d in data.values() for cid in running_containers(d) if cid.startswith("island-")]
            assert len(everywhere) == REPLICAS, everywhere
        finally:
            for c in [*clients, client]:
                try:
                    with trio.move_on_after(10):
                        await c.call("workloads.stop", WorkloadRef("island"), response=WorkloadReply)
                        break
                except CloudlessError:
                    continue

            async def gone():
                # Removed, not only stopped: a stopped container's root is still mounted until
                # its agent deletes it, and tearing the nodes down before then leaked the mount.
                return not any(
                    any(containers_dir(d).iterdir()) for d in data.values() if containers_dir(d).is_dir()
                ) and not mounts_under(tmp_path)

            try:
                await eventually("every container removed", gone, timeout_s=45)
            finally:
                for c in set([*clients, client]):
                    await c.aclose()
    assert not mounts_under(tmp_path)
