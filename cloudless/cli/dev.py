"""`cloudless dev up|down`: a local cluster of N nodes on loopback.

    D/node<i>/          each node's data dir; node.pid holds its pid and
                        dev.json its listen address
    D/config.yaml       client config naming every node's endpoint

`dev up` bootstraps node1, creates a token, joins the others, and (unless
`--no-wait`) returns only once every node is alive, a leader is elected and
the voter set is as large as autopilot wants it for N nodes — so killing the
leader right after leaves a quorum to elect another. Run again, it restarts
any node of D that is not running and starts new ones for a larger
`--nodes`; a flag it cannot apply to what runs (fewer nodes, other ports, S3
on a running node1) is refused, changing nothing. `dev down` stops the nodes
(SIGTERM, then SIGKILL after a grace period), then removes what they made on
this host for containers: the containers, their overlay mounts, the nodes'
bridges and tagged iptables rules (`--keep-containers` leaves those).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import click
import msgspec
import trio

from cloudless import selfexec
from cloudless.agent.teardown import SandboxRemoval, remove_node_sandbox
from cloudless.api import client_config
from cloudless.api.client import ClusterClient
from cloudless.api.messages import StatusReply, StatusRequest, TokenCreate, TokenReply
from cloudless.cli.output import emit_json, fail, stderr, stdout
from cloudless.coordinator.autopilot import AutopilotConfig, voters_wanted
from cloudless.errors import CloudlessError, InvalidInput, Unavailable

READY_TIMEOUT = 120.0
DEFAULT_NODES = 3
DEFAULT_BASE_PORT = 7101
DEFAULT_STABILIZATION = 2.0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # os.kill(0 or -1, ...) would address a process group or everything
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _read_pid(node_dir: Path) -> int | None:
    try:
        return int((node_dir / "node.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _pick_ports(n: int, base: int) -> list[int]:
    ports: list[int] = []
    port = base
    while len(ports) < n and port < 65000:
        if _port_free(port):
            ports.append(port)
        port += 1
    if len(ports) < n:
        raise Unavailable(f"no {n} free ports from {base}")
    return ports


def _start(node_dir: Path, args: list[str], stabilization: float = 2.0) -> int:
    node_dir.mkdir(parents=True, exist_ok=True)
    args = [*args, "--voter-stabilization", str(stabilization)]
    with open(node_dir / "node.out", "ab") as log:
        proc = subprocess.Popen(
            [*selfexec.cloudless_argv(), "node", "--data-dir", str(node_dir), *args],
            env=selfexec.cloudless_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # survives the shell that ran `dev up`
        )
    (node_dir / "node.pid").write_text(f"{proc.pid}\n")
    return proc.pid


Progress = Callable[[str], None]


def _no_progress(text: str) -> None:
    pass


async def _wait_status(
    context: client_config.Context, endpoint: str, want_members: int, timeout: float, progress: Progress = _no_progress
) -> StatusReply:
    deadline = trio.current_time() + timeout
    last_error: Exception | None = None
    while trio.current_time() < deadline:
        client = ClusterClient(context, endpoint=endpoint, timeout=3.0)
        try:
            reply = await client.call("status", StatusRequest(), response=StatusReply)
            alive = [m for m in reply.members if m.state == "alive"]
            if reply.leader and len(alive) >= want_members:
                return reply
            last_error = Unavailable(f"{len(alive)}/{want_members} members alive, leader {reply.leader or 'none'}")
        except CloudlessError as exc:
            last_error = exc
        finally:
            await client.aclose()
        progress(f"waiting for {endpoint}: {last_error}")
        await trio.sleep(0.3)
    raise Unavailable(f"cluster not healthy after {timeout:.0f}s: {last_error}")


async def _wait_ready(
    context: client_config.Context,
    directory: Path,
    plans: dict[int, dict],
    timeout_s: float,
    progress: Progress,
) -> StatusReply:
    """Every node alive, a leader, and as many voters as autopilot wants for this many nodes."""
    names = {plan["name"] for plan in plans.values()}
    want_voters = voters_wanted(len(names), AutopilotConfig())
    deadline = trio.current_time() + timeout_s
    client = ClusterClient(context, timeout=3.0)
    last = "no answer yet"
    try:
        while True:
            for i in sorted(plans):
                node_dir = directory / f"node{i}"
                if not _pid_alive(_read_pid(node_dir) or -1):
                    raise CloudlessError(f"node{i} exited during start-up; see {node_dir / 'node.out'}")
            try:
                reply = await client.call("status", StatusRequest(), response=StatusReply)
            except CloudlessError as exc:
                last = f"no node answered ({exc.message})"
            else:
                alive = {m.name for m in reply.members if m.state == "alive"} | {
                    m.id for m in reply.members if m.state == "alive"
                }
                up = len(names & alive)
                voters = len(reply.voters)
                last = f"{up}/{len(names)} nodes up, {voters}/{want_voters} voters, leader {reply.leader or 'none'}"
                if up == len(names) and reply.leader and voters >= want_voters:
                    return reply
            progress(last)
            if trio.current_time() >= deadline:
                raise Unavailable(
                    f"cluster at {directory} not ready after {timeout_s:.0f}s: {last}; see {directory}/node*/node.out"
                )
            await trio.sleep(0.3)
    finally:
        await client.aclose()


def _wait_file(path: Path, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if not _pid_alive(pid):
            raise CloudlessError(f"node exited during start-up; see {path.parent / 'node.out'}")
        time.sleep(0.05)
    raise Unavailable(f"{path} did not appear within {timeout:.0f}s")


@click.group(help="A local development cluster on loopback.")
def dev() -> None:
    pass


@dev.command("up", help="Start (or restart) N local nodes and write D/config.yaml; waits until the cluster is ready.")
@click.option(
    "--nodes",
    "count",
    type=click.IntRange(1, 64),
    default=None,
    help=f"Number of nodes [default: {DEFAULT_NODES}, or as many as D has]; more than D has starts new ones.",
)
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
@click.option(
    "--base-port",
    type=click.IntRange(1024, 64000),
    default=None,
    help=f"First port to try for a new cluster [default: {DEFAULT_BASE_PORT}]; fixed once it exists.",
)
@click.option(
    "--voter-stabilization",
    type=click.FloatRange(0, 3600),
    default=None,
    help=f"Passed to each node: seconds before a new member may become a voter [default: {DEFAULT_STABILIZATION}].",
)
@click.option(
    "--s3-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the S3 gateway on node1 at 127.0.0.1:PORT (0: off); changes need node1 stopped.",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    help="Return only once every node is up, a leader elected and the voter set complete (default).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=READY_TIMEOUT,
    show_default=True,
    help="Seconds to wait before giving up (exit 5).",
)
@click.option("--json", "as_json", is_flag=True)
def up(
    count: int | None,
    directory: Path,
    base_port: int | None,
    voter_stabilization: float | None,
    s3_port: int | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    show = stderr.is_terminal and not as_json  # progress for people; nothing extra when piped
    try:
        if show:
            with stderr.status("starting nodes") as status:
                result = _up(
                    count,
                    directory.resolve(),
                    base_port,
                    voter_stabilization,
                    s3_port,
                    wait=wait,
                    timeout=timeout,
                    progress=lambda text: status.update(text),
                )
        else:
            result = _up(
                count, directory.resolve(), base_port, voter_stabilization, s3_port, wait=wait, timeout=timeout
            )
    except CloudlessError as exc:
        fail(exc, as_json)
    if as_json:
        emit_json(result)
    else:
        state = f"leader {result['leader']}" if result["leader"] else "not waited for"
        stdout.print(f"cluster {result['cluster_id']} up: {len(result['nodes'])} nodes, {state}", markup=False)
        stdout.print(f"export CLOUDLESS_CONFIG={result['config']}", markup=False, highlight=False)


def _refusals(
    directory: Path,
    plans: dict[int, dict],
    count: int | None,
    base_port: int | None,
    stabilization: float | None,
    s3_port: int | None,
) -> list[str]:
    """Why the flags cannot be applied to the cluster in `directory` as it runs (empty: they can)."""
    why = []
    running = {i for i in plans if _pid_alive(_read_pid(directory / f"node{i}") or -1)}
    if count is not None and count < len(plans):
        why.append(
            f"--nodes {count}: the cluster has {len(plans)} nodes and dev up does not remove any"
            " (`cloudless nodes rm NAME`, or dev down and a new --dir)"
        )
    first_port = int(plans[min(plans)]["listen"].rsplit(":", 1)[1])
    if base_port is not None and base_port != first_port:
        why.append(f"--base-port {base_port}: the cluster's ports are fixed (node1 listens on {first_port})")
    if s3_port is not None and 1 in running:
        want = f"127.0.0.1:{s3_port}" if s3_port else None
        have = plans[1].get("s3")
        if want != have:
            why.append(
                f"--s3-port {s3_port}: node1 is running with the S3 gateway {'on ' + have if have else 'off'};"
                " stop it (dev down) to change that"
            )
    if stabilization is not None:
        differing = sorted(
            f"node{i}"
            for i in running
            if float(plans[i].get("voter_stabilization", DEFAULT_STABILIZATION)) != stabilization
        )
        if differing:
            why.append(
                f"--voter-stabilization {stabilization:g}: {', '.join(differing)} run with another value;"
                " stop them (dev down) to change it"
            )
    return why


def _up(
    count: int | None,
    directory: Path,
    base_port: int | None,
    voter_stabilization: float | None = None,
    s3_port: int | None = None,
    *,
    wait: bool = True,
    timeout: float = READY_TIMEOUT,
    progress: Progress = _no_progress,
) -> dict:
    plans: dict[int, dict] = {}
    if directory.is_dir():
        for p in directory.glob("node*"):
            if p.name[4:].isdigit() and (p / "dev.json").exists():
                plans[int(p.name[4:])] = json.loads((p / "dev.json").read_text())
    if plans:
        refused = _refusals(directory, plans, count, base_port, voter_stabilization, s3_port)
        if refused:
            raise InvalidInput(f"{directory} is a running cluster; " + "; ".join(refused), field="flags")
    if s3_port and not _port_free(s3_port) and not (plans.get(1, {}).get("s3") == f"127.0.0.1:{s3_port}"):
        raise InvalidInput(f"--s3-port {s3_port}: the port is in use", field="s3_port")
    directory.mkdir(parents=True, exist_ok=True)
    count = max(count or (len(plans) or DEFAULT_NODES), len(plans))
    stabilization = DEFAULT_STABILIZATION if voter_stabilization is None else voter_stabilization
    new_indexes = [i for i in range(1, count + 1) if i not in plans]
    if new_indexes:
        progress(f"starting {len(new_indexes)} new node(s)")
    base = base_port or DEFAULT_BASE_PORT
    ports = _pick_ports(len(new_indexes), base + len(plans)) if new_indexes else []
    for i, port in zip(new_indexes, ports, strict=True):
        plans[i] = {"listen": f"127.0.0.1:{port}", "name": f"node{i}", "voter_stabilization": stabilization}
    for plan in plans.values():  # applies to the nodes (re)started below; running ones were checked above
        if voter_stabilization is not None:
            plan["voter_stabilization"] = voter_stabilization

    first = directory / "node1"
    seed = plans[1]["listen"]
    if s3_port is not None:
        if s3_port:
            plans[1]["s3"] = f"127.0.0.1:{s3_port}"
        else:
            plans[1].pop("s3", None)
    s3_args = ["--s3-listen", plans[1]["s3"]] if plans[1].get("s3") else []

    def stabilization_of(i: int) -> float:
        return float(plans[i].get("voter_stabilization", DEFAULT_STABILIZATION))

    if not (first / "node.json").exists():
        pid = _start(first, ["--listen", seed, "--name", plans[1]["name"], *s3_args], stabilization_of(1))
        (first / "dev.json").write_text(json.dumps(plans[1]))
        _wait_file(first / "admin.yaml", pid, timeout)
    elif not _pid_alive(_read_pid(first) or -1):
        progress("restarting node1")
        (first / "dev.json").write_text(json.dumps(plans[1]))
        _start(first, ["--listen", seed, *s3_args], stabilization_of(1))
    admin = client_config.load(first / "admin.yaml")
    context = admin.context()

    async def token_for(n: int) -> str:
        await _wait_status(context, seed, 1, timeout, progress)
        client = ClusterClient(context, endpoint=seed)
        try:
            for _ in range(50):
                try:
                    reply = await client.call(
                        "token.create", TokenCreate(600.0, n, "node", "coordinator"), response=TokenReply
                    )
                    return reply.token
                except Unavailable:
                    await trio.sleep(0.2)
            raise Unavailable("could not create a join token")
        finally:
            await client.aclose()

    joiners = [i for i in sorted(plans) if i != 1 and not (directory / f"node{i}" / "node.json").exists()]
    token = trio.run(token_for, len(joiners)) if joiners else ""
    for i in sorted(plans):
        if i == 1:
            continue
        node_dir = directory / f"node{i}"
        plan = plans[i]
        if i in joiners:
            progress(f"starting node{i}")
            _start(
                node_dir,
                ["--listen", plan["listen"], "--name", plan["name"], "--join", seed, "--token", token],
                stabilization_of(i),
            )
            (node_dir / "dev.json").write_text(json.dumps(plan))
        elif not _pid_alive(_read_pid(node_dir) or -1):
            progress(f"restarting node{i}")
            (node_dir / "dev.json").write_text(json.dumps(plan))
            _start(node_dir, ["--listen", plan["listen"]], stabilization_of(i))

    endpoints = [plans[i]["listen"] for i in sorted(plans)]
    context = client_config.Context(
        context.name, context.cluster_id, endpoints, context.ca_pem, context.certificate_pem, context.key_pem
    )
    config = client_config.ClientConfig(contexts={context.name: context}, current_context=context.name)
    config_path = directory / "config.yaml"
    config.save(config_path)
    leader = ""
    if wait:
        reply = trio.run(_wait_ready, context, directory, plans, timeout, progress)
        leader = reply.leader
    return {
        "cluster_id": context.cluster_id,
        "config": str(config_path),
        "leader": leader,
        "nodes": [
            {
                "name": plans[i]["name"],
                "address": plans[i]["listen"],
                "pid": _read_pid(directory / f"node{i}"),
                "dir": str(directory / f"node{i}"),
            }
            for i in sorted(plans)
        ],
    }


@dev.command("down", help="Stop every node of a dev cluster and remove their containers, mounts and networks.")
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
@click.option(
    "--timeout", type=click.FloatRange(0, 600), default=10.0, show_default=True, help="Seconds before SIGKILL."
)
@click.option(
    "--keep-containers",
    is_flag=True,
    help="Leave the containers running (with their mounts and networks); a later dev up adopts them.",
)
@click.option("--json", "as_json", is_flag=True)
def down(directory: Path, timeout: float, keep_containers: bool, as_json: bool) -> None:
    directory = directory.resolve()
    node_dirs = sorted(p for p in directory.glob("node*") if p.name[4:].isdigit()) if directory.is_dir() else []
    if not node_dirs:
        fail(InvalidInput(f"{directory} is not a dev cluster directory"), as_json)
    stopped = []
    pids = {}
    for node_dir in node_dirs:
        pid = _read_pid(node_dir)
        if pid and _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            pids[node_dir.name] = pid
    deadline = time.monotonic() + timeout
    for name, pid in pids.items():
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):  # its containers are only ours to remove once it is gone
                time.sleep(0.05)
        stopped.append(name)
    for node_dir in node_dirs:
        (node_dir / "node.pid").unlink(missing_ok=True)
    removed: dict[str, SandboxRemoval] = {}
    if not keep_containers:
        for node_dir in node_dirs:
            removed[node_dir.name] = trio.run(remove_node_sandbox, node_dir)
    containers = sorted(c for r in removed.values() for c in r.containers)
    errors = [f"{name}: {e}" for name, r in removed.items() for e in r.errors]
    if as_json:
        emit_json({"stopped": stopped, "removed": {name: msgspec.to_builtins(r) for name, r in removed.items()}})
    else:
        kept = " (containers kept)" if keep_containers else f", removed {len(containers)} container(s)"
        stdout.print(f"stopped {len(stopped)} node(s){kept}", markup=False)
    if errors:
        fail(CloudlessError("could not remove everything: " + "; ".join(errors)), as_json)
