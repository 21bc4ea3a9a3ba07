"""`cloudless node` processes on loopback, driven through the CLI exactly as a
user would: the integration tests' way to get a real cluster without network
namespaces (the chaos harness, `chaos.py`, is for faults between hosts).

    node1 = NodeProcess(tmp_path / "node1", free_port(), "node1")
    config = bootstrap(node1)                      # the admin client config
    join(config, node1, NodeProcess(tmp_path / "node2", free_port(), "node2"))
    wait_for(lambda: len(status(config)["voters"]) == 2, 60, "two voters")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "cloudless"]

# What a CLI call against a node that is still starting (or not yet enrolled)
# fails with: a non-zero exit (AssertionError from `cli(check=True)`), no JSON
# on stdout, or no answer in time.
STARTING_UP = (AssertionError, json.JSONDecodeError, subprocess.TimeoutExpired)


def free_port() -> int:
    """A port free for both TCP and UDP (a node serves both on one number)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def cli(
    *args: str, config: Path | None = None, timeout: float = 30, check: bool = False
) -> subprocess.CompletedProcess:
    """`cloudless <args>` as a user runs it, with `config` as CLOUDLESS_CONFIG."""
    env = dict(os.environ)
    if config is not None:
        env["CLOUDLESS_CONFIG"] = str(config)
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"cloudless {' '.join(args)} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(*args: str, config: Path, timeout: float = 30) -> Any:
    """The `--json` document of a CLI call that must succeed."""
    proc = cli(*args, "--json", config=config, timeout=timeout, check=True)
    return json.loads(proc.stdout)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.3,
    tolerate: tuple[type[BaseException], ...] = STARTING_UP,
) -> Any:
    """Poll until `predicate` returns something true, and return it. A failure in
    `tolerate` counts as "not yet" (nodes start, elect and converge while the test
    asks); any other one is a real failure and ends the wait at once."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except tolerate as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}: last={last!r}")


class NodeProcess:
    """One `cloudless node` on 127.0.0.1:`port`, its output appended to
    `<data_dir>/node.out` so that a restart (same data dir) keeps the history."""

    def __init__(self, data_dir: Path, port: int, name: str, *extra: str) -> None:
        self.data_dir = data_dir
        self.port = port
        self.name = name
        self.address = f"127.0.0.1:{port}"
        self.extra = ["--name", name, *extra]
        self.proc: subprocess.Popen | None = None

    def start(self, *join_args: str) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "node.out", "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *CLI,
                    "node",
                    "--data-dir",
                    str(self.data_dir),
                    "--listen",
                    self.address,
                    "--voter-stabilization",
                    "1",
                    *self.extra,
                    *join_args,
                ],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (the node's graceful leave), SIGKILL if it takes over 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def output(self, tail: int = 4000) -> str:
        """The end of the node's output, for a failure message."""
        try:
            return (self.data_dir / "node.out").read_text()[-tail:]
        except OSError:
            return ""


def token(config: Path, *args: str) -> str:
    """A new bootstrap token (`cloudless token create <args>`)."""
    return cli_json("token", "create", *args, config=config)["token"]


def status(config: Path, endpoint: str | None = None) -> dict:
    """`cloudless status`, through `endpoint` when the config's node is not the one to ask."""
    extra = ("--endpoint", endpoint) if endpoint else ()
    return cli_json("status", *extra, config=config)


def bootstrap(first: NodeProcess) -> Path:
    """Start `first` on an empty data dir, so it creates the cluster; its admin
    client config once it writes one and leads."""
    first.start()
    config = first.data_dir / "admin.yaml"
    wait_for(config.exists, 20, "admin config")
    wait_for(lambda: status(config)["leader"] == first.name, 20, f"{first.name} to lead")
    return config


def join(config: Path, first: NodeProcess, *joiners: NodeProcess) -> None:
    """Start `joiners` against `first` with one token good for exactly that many
    joins; returns at once (waiting for the voters is the caller's assertion)."""
    join_token = token(config, "--uses", str(len(joiners)), "--trust", "coordinator")
    for node in joiners:
        node.start("--join", first.address, "--token", join_token)
