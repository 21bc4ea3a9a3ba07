"""End to end on a real local cluster with runc: `cloudless run` 3 replicas →
running on 3 nodes; scale to 1; `kill -9` of a node holding a replica → the
replica is lost and replaced elsewhere; logs and exec relayed through the
cluster; stop removes every container."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")]


def cli(
    bin_: str, *args: str, config: Path | None = None, check: bool = True, timeout: float = 90.0
) -> subprocess.CompletedProcess:
    argv = [bin_, *args]
    env = dict(os.environ)
    if config is not None:
        env["CLOUDLESS_CONFIG"] = str(config)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(bin_: str, *args: str, config: Path) -> object:
    if "--" in args:  # options go before the container's command
        i = args.index("--")
        args = (*args[:i], "--json", *args[i:])
    else:
        args = (*args, "--json")
    return json.loads(cli(bin_, *args, config=config).stdout)


def wait_until(what: str, predicate, timeout: float = 60.0, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def inspect_when(bin_: str, config: Path, condition, name: str = "hello"):
    """A predicate for wait_until: the inspect document once `condition(doc)` holds."""

    def check():
        doc = cli_json(bin_, "inspect", name, config=config)
        return doc if condition(doc) else NotYet(doc)

    return check


class NotYet:
    """A falsy inspect document, shown when a wait times out."""

    def __init__(self, doc: dict) -> None:
        self.doc = doc

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        allocations = [(a["id"], a["node"], a["state"], a["desired"], a["message"]) for a in self.doc["allocations"]]
        return f"state {self.doc['state']}, allocations {allocations}, explanations {self.doc['explanations']}"


def restart_node(node_dir: Path, address: str) -> None:
    """Start a dev cluster node again, as `cloudless dev up` does (it reads node.pid)."""
    with open(node_dir / "node.out", "ab") as out:
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
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    (node_dir / "node.pid").write_text(f"{proc.pid}\n")


def live(doc: dict) -> list[dict]:
    return [a for a in doc["allocations"] if a["desired"] == "run" and a["state"] == "running"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cloudless_bin = shutil.which("cloudless") or os.path.join(os.path.dirname(sys.executable), "cloudless")
    tmp_path = tmp_path_factory.mktemp("workloads")
    directory = tmp_path / "cluster"
    base = 20000 + random.Random().randrange(0, 20000)
    up = cli(
        cloudless_bin,
        "dev",
        "up",
        "--nodes",
        "3",
        "--dir",
        str(directory),
        "--base-port",
        str(base),
        "--json",
        timeout=120,
    )
    info = json.loads(up.stdout)
    config = Path(info["config"])
    image = tmp_path / "image"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from cloudless.sandbox.imagebuild import build_busybox_image; build_busybox_image(Path({str(image)!r}), 'layout')",
        ],
        check=True,
        timeout=60,
    )
    for node in info["nodes"]:
        cli(
            cloudless_bin,
            "image",
            "import",
            str(image / "layout"),
            "--name",
            "busybox:latest",
            "--data-dir",
            node["dir"],
            "--json",
        )
    try:
        yield config, info
    finally:
        for name in ("hello", "canary", "island"):
            cli(cloudless_bin, "stop", name, config=config, check=False)
        containers = list(directory.glob("node*/agent/sandbox/containers"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(any(c.iterdir()) for c in containers if c.exists()):
            time.sleep(0.3)
        cli(cloudless_bin, "dev", "down", "--dir", str(directory), check=False)
        leftovers = [p.name for c in containers if c.exists() for p in c.iterdir()]
        assert not leftovers, f"containers left behind: {leftovers}"


def test_run_scale_kill_a_node_then_stop(cluster, cloudless_bin):
    config, info = cluster
    pids = {n["name"]: n["pid"] for n in info["nodes"]}
    run = cli_json(
        cloudless_bin,
        "run",
        "busybox:latest",
        "--name",
        "hello",
        "--replicas",
        "3",
        "--memory",
        "32Mi",
        "--",
        "sh",
        "-c",
        "while true; do echo hello from $HOSTNAME; sleep 1; done",
        config=config,
    )
    assert run["name"] == "hello" and run["version"] == 1

    doc = wait_until("3 running replicas", inspect_when(cloudless_bin, config, lambda d: len(live(d)) == 3))
    assert sorted(a["node"] for a in live(doc)) == ["node1", "node2", "node3"]  # spread over nodes
    assert set(doc["allocations"][0]) >= {"id", "node", "state", "exit_code", "restarts"}
    ps = cli_json(cloudless_bin, "ps", config=config)
    assert ps == {
        "items": [
            {
                "name": "hello",
                "image": "busybox:latest",
                "version": 1,
                "desired": 3,
                "running": 3,
                "state": "running",
                "pending_reason": "",
            }
        ]
    }

    # Logs come through the cluster from every replica's node; exec runs inside one.
    logs = wait_until(
        "log lines",
        lambda: [
            line
            for line in cli_json(cloudless_bin, "logs", "hello", "--tail", "1", config=config)["items"]
            if line["text"]
        ],
    )
    assert {line["replica"] for line in logs} == {0, 1, 2}
    assert all(line["text"].startswith("hello from hello-") for line in logs)
    ex = cli_json(
        cloudless_bin, "exec", "hello", "--replica", "1", "--", "sh", "-c", "echo $CLOUDLESS_REPLICA", config=config
    )
    assert ex["exit_code"] == 0 and ex["stdout"].strip() == "1"

    cli(cloudless_bin, "scale", "hello", "1", config=config)
    doc = wait_until(
        "one replica left",
        inspect_when(
            cloudless_bin,
            config,
            lambda d: (
                len(live(d)) == 1 and all(a["state"] == "exited" for a in d["allocations"] if a["desired"] == "stop")
            ),
        ),
        timeout=45,
    )
    status = cli_json(cloudless_bin, "status", config=config)
    leader = status["leader"]
    holder = live(doc)[0]["node"]
    if holder == leader:
        # Killing the only voter would stop the cluster itself: put a replica on a follower.
        cli(cloudless_bin, "scale", "hello", "2", config=config)
        doc = wait_until("two replicas", inspect_when(cloudless_bin, config, lambda d: len(live(d)) == 2))
        holder = next(a["node"] for a in live(doc) if a["node"] != leader)
    victim = next(a for a in live(doc) if a["node"] == holder)
    wanted = len(live(doc))

    os.kill(pids[holder], signal.SIGKILL)
    killed_at = time.monotonic()
    doc = wait_until(
        "the replica replaced elsewhere",
        inspect_when(cloudless_bin, config, lambda d: len([a for a in live(d) if a["node"] != holder]) == wanted),
        timeout=60,
    )
    healed_s = time.monotonic() - killed_at
    states = {a["id"]: a["state"] for a in doc["allocations"]}
    assert states[victim["id"]] == "lost"
    replacement = next(a for a in live(doc) if a["replica"] == victim["replica"])
    assert replacement["node"] != holder
    print(f"replica on {holder} replaced on {replacement['node']} after {healed_s:.1f}s")

    # The node comes back with its old container still running (containers outlive
    # the node process): its agent learns the replica was replaced and stops it.
    node = next(n for n in info["nodes"] if n["name"] == holder)
    restart_node(Path(node["dir"]), node["address"])
    stale = Path(node["dir"]) / "agent" / "sandbox" / "containers" / victim["id"]
    wait_until("the replaced container removed from the returning node", lambda: not stale.exists(), timeout=60)
    doc = cli_json(cloudless_bin, "inspect", "hello", config=config)
    assert len(live(doc)) == wanted  # no duplicate, nothing lost

    cli(cloudless_bin, "stop", "hello", config=config)
    wait_until("stopped", lambda: cli_json(cloudless_bin, "ps", config=config)["items"][0]["running"] == 0, timeout=45)
    assert cli_json(cloudless_bin, "ps", config=config)["items"][0]["state"] == "stopped"


CANARY = """
name: canary
image: busybox:latest
command: [sh, -c, "{prelude}while true; do sleep 1; done"]
replicas: 2
health_check: {{kind: exec, command: [sh, -c, "test ! -e /tmp/bad"], interval_s: 1, timeout_s: 1, retries: 2}}
update: {{max_surge: 1, min_healthy_time_s: 1, healthy_deadline_s: 60, auto_revert: true}}
"""


def test_update_failing_its_health_check_reverts_to_the_stable_version(cluster, cloudless_bin, tmp_path):
    config, _ = cluster
    good = tmp_path / "good.yaml"
    good.write_text(CANARY.format(prelude=""))
    assert cli_json(cloudless_bin, "apply", "-f", str(good), config=config)["version"] == 1
    wait_until(
        "version 1 healthy and stable",
        inspect_when(
            cloudless_bin,
            config,
            lambda d: d["stable_version"] == 1 and all(a["health"] == "healthy" for a in live(d)),
            name="canary",
        ),
        timeout=60,
    )
    first = {a["id"] for a in live(cli_json(cloudless_bin, "inspect", "canary", config=config))}

    bad = tmp_path / "bad.yaml"
    bad.write_text(CANARY.format(prelude="touch /tmp/bad; "))
    assert cli_json(cloudless_bin, "apply", "-f", str(bad), config=config)["version"] == 2
    doc = wait_until(
        "the failed version reverted",
        inspect_when(
            cloudless_bin,
            config,
            lambda d: (
                d["failed_versions"] == [2]
                and d["spec"]["version"] == 3
                and len(live(d)) == 2
                and all(a["version"] != 2 for a in live(d))
            ),
            name="canary",
        ),
        timeout=90,
    )
    assert "touch" not in " ".join(doc["spec"]["command"])  # the stable spec is back
    assert {a["id"] for a in live(doc)} == first  # the stable replicas were never replaced
    events = cli_json(cloudless_bin, "events", "--last", "1000", config=config)["items"]
    assert any(e["kind"] == "workload.rollout_failed" and "canary version 2" in e["message"] for e in events)
    wait_until(
        "the failed replica stopped",
        inspect_when(
            cloudless_bin,
            config,
            lambda d: all(a["state"] in ("exited", "failed") for a in d["allocations"] if a["version"] == 2),
            name="canary",
        ),
        timeout=45,
    )
    cli(cloudless_bin, "stop", "canary", config=config)


def running_containers(node_dir: Path) -> set[str]:
    out = subprocess.run(
        ["runc", "--root", str(node_dir / "agent" / "sandbox" / "runc"), "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return {c["id"] for c in json.loads(out.stdout or "null") or [] if c["status"] == "running"}


def test_node_rebooted_with_no_coordinator_restarts_its_replicas_then_the_cluster_reconciles(cluster, cloudless_bin):
    config, info = cluster
    dirs = {n["name"]: Path(n["dir"]) for n in info["nodes"]}
    cli(
        cloudless_bin,
        "run",
        "busybox:latest",
        "--name",
        "island",
        "--replicas",
        "3",
        "--memory",
        "16Mi",
        "--",
        "sh",
        "-c",
        "while true; do sleep 1; done",
        config=config,
    )
    doc = wait_until(
        "3 running replicas", inspect_when(cloudless_bin, config, lambda d: len(live(d)) == 3, name="island")
    )
    node = live(doc)[0]["node"]
    mine = {a["id"] for a in live(doc) if a["node"] == node}

    # Power cut: every node process dies at once; on `node` the machine reboots (its containers die too).
    for d in dirs.values():
        os.kill(int((d / "node.pid").read_text()), signal.SIGKILL)
    for cid in mine:
        subprocess.run(
            ["runc", "--root", str(dirs[node] / "agent" / "sandbox" / "runc"), "kill", cid, "KILL"], timeout=30
        )
    wait_until("the rebooted node's containers dead", lambda: not (running_containers(dirs[node]) & mine), timeout=30)

    # It comes back alone: no coordinator anywhere, yet its agent restarts its replicas from local state.
    restart_node(dirs[node], next(n["address"] for n in info["nodes"] if n["name"] == node))
    wait_until("replicas restarted without a coordinator", lambda: mine <= running_containers(dirs[node]), timeout=60)

    # The rest of the cluster returns: exactly the desired replicas, none twice.
    for n in info["nodes"]:
        if n["name"] != node:
            restart_node(dirs[n["name"]], n["address"])
    doc = wait_until(
        "the cluster reconciled",
        inspect_when(cloudless_bin, config, lambda d: len(live(d)) == 3, name="island"),
        timeout=90,
    )
    time.sleep(3)  # let any duplicate the controller might start show up
    everywhere = [cid for d in dirs.values() for cid in running_containers(d) if cid.startswith("island-")]
    assert len(everywhere) == 3, everywhere
    assert {a["replica"] for a in live(cli_json(cloudless_bin, "inspect", "island", config=config))} == {0, 1, 2}
    cli(cloudless_bin, "stop", "island", config=config)
