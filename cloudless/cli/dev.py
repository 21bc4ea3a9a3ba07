"""`cloudless dev up|down`: a local cluster of N nodes on loopback.

    D/node<i>/          each node's data dir; node.pid holds its pid and
                        dev.json its listen address
    D/config.yaml       client config naming every node's endpoint

`dev up` bootstraps node1, creates a token, joins the others, waits until
every node is alive and a leader is elected, and returns. Run again, it
restarts any node of D that is not running. `dev down` stops them all
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import click
import trio

from cloudless import selfexec
from cloudless.api import client_config
from cloudless.api.client import ClusterClient
from cloudless.api.messages import StatusReply, StatusRequest, TokenCreate, TokenReply
from cloudless.cli.output import emit_json, fail, stdout
from cloudless.errors import CloudlessError, InvalidInput, Unavailable

READY_TIMEOUT = 60.0


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


async def _wait_status(context: client_config.Context, endpoint: str, want_members: int, timeout: float) -> StatusReply:
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
        await trio.sleep(0.3)
    raise Unavailable(f"cluster not healthy after {timeout:.0f}s: {last_error}")


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


@dev.command("up", help="Start (or restart) N local nodes and write D/config.yaml.")
@click.option("--nodes", "count", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
@click.option("--base-port", type=click.IntRange(1024, 64000), default=7101, show_default=True)
@click.option(
    "--voter-stabilization",
    type=click.FloatRange(0, 3600),
    default=2.0,
    show_default=True,
    help="Passed to each node: seconds before a new member may become a voter.",
)
@click.option(
    "--s3-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Serve the S3 gateway on node1 at 127.0.0.1:PORT (0: off).",
)
@click.option("--json", "as_json", is_flag=True)
def up(count: int, directory: Path, base_port: int, voter_stabilization: float, s3_port: int, as_json: bool) -> None:
    try:
        result = _up(count, directory.resolve(), base_port, voter_stabilization, s3_port)
    except CloudlessError as exc:
        fail(exc, as_json)
    if as_json:
        emit_json(result)
    else:
        stdout.print(f"cluster {result['cluster_id']} up: {len(result['nodes'])} nodes, leader {result['leader']}")
        stdout.print(f"export CLOUDLESS_CONFIG={result['config']}")


def _up(count: int, directory: Path, base_port: int, voter_stabilization: float = 2.0, s3_port: int = 0) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(
        (p for p in directory.glob("node*") if (p / "dev.json").exists()), key=lambda p: int(p.name[4:] or 0)
    )
    count = max(count, len(existing))
    plans: dict[int, dict] = {}
    for p in existing:
        plans[int(p.name[4:])] = json.loads((p / "dev.json").read_text())
    new_indexes = [i for i in range(1, count + 1) if i not in plans]
    ports = _pick_ports(len(new_indexes), base_port + len(plans)) if new_indexes else []
    for i, port in zip(new_indexes, ports):
        plans[i] = {"listen": f"127.0.0.1:{port}", "name": f"node{i}"}

    first = directory / "node1"
    seed = plans[1]["listen"]
    if s3_port:
        plans[1]["s3"] = f"127.0.0.1:{s3_port}"
    s3_args = ["--s3-listen", plans[1]["s3"]] if plans[1].get("s3") else []
    if not (first / "node.json").exists():
        pid = _start(first, ["--listen", seed, "--name", plans[1]["name"], *s3_args], voter_stabilization)
        (first / "dev.json").write_text(json.dumps(plans[1]))
        _wait_file(first / "admin.yaml", pid, READY_TIMEOUT)
    elif not _pid_alive(_read_pid(first) or -1):
        (first / "dev.json").write_text(json.dumps(plans[1]))
        _start(first, ["--listen", seed, *s3_args], voter_stabilization)
    admin = client_config.load(first / "admin.yaml")
    context = admin.context()

    async def token_for(n: int) -> str:
        await _wait_status(context, seed, 1, READY_TIMEOUT)
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
            _start(
                node_dir,
                ["--listen", plan["listen"], "--name", plan["name"], "--join", seed, "--token", token],
                voter_stabilization,
            )
            (node_dir / "dev.json").write_text(json.dumps(plan))
        elif not _pid_alive(_read_pid(node_dir) or -1):
            _start(node_dir, ["--listen", plan["listen"]], voter_stabilization)

    endpoints = [plans[i]["listen"] for i in sorted(plans)]
    config = client_config.ClientConfig(
        contexts={
            context.name: client_config.Context(
                context.name, context.cluster_id, endpoints, context.ca_pem, context.certificate_pem, context.key_pem
            )
        },
        current_context=context.name,
    )
    config_path = directory / "config.yaml"
    config.save(config_path)
    reply = trio.run(_wait_status, context, seed, len(plans), READY_TIMEOUT)
    return {
        "cluster_id": reply.cluster_id,
        "config": str(config_path),
        "leader": reply.leader,
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


@dev.command("down", help="Stop every node of a dev cluster.")
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds before SIGKILL.")
@click.option("--json", "as_json", is_flag=True)
def down(directory: Path, timeout: float, as_json: bool) -> None:
    if not directory.is_dir():
        fail(InvalidInput(f"{directory} is not a dev cluster directory"), as_json)
    stopped = []
    pids = {}
    for node_dir in sorted(directory.glob("node*")):
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
        stopped.append(name)
    for node_dir in directory.glob("node*"):
        (node_dir / "node.pid").unlink(missing_ok=True)
    if as_json:
        emit_json({"stopped": stopped})
    else:
        stdout.print(f"stopped {len(stopped)} node(s)")
