"""A real first node puts its admin context where the CLI looks, and the CLI's
output against a real cluster: `nodes --json`, `-o yaml|wide`, piped tables
with long IDs, one-line errors with their exit codes."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest
import yaml

from cloudless.api import client_config
from cloudless.api.client_config import ClientConfig
from tests.harness.node_cluster import CLI, free_port, wait_for

from ..unit.cli.test_cli_output import make_context

LONG_NAME = "gateway-" + "a" * 50 + "-1"  # 60 characters: a table cut at 80 columns loses it


def start_node(data_dir: Path, port: int, name: str, env: dict, *extra: str, terminal: bool) -> subprocess.Popen:
    """`cloudless node` bootstrapping a cluster; stdin is a terminal when `terminal` (as for a person at a shell)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    stdin: int = subprocess.DEVNULL
    master = slave = -1
    if terminal:
        master, slave = pty.openpty()
        stdin = slave
    with open(data_dir / "node.out", "ab") as out:
        proc = subprocess.Popen(
            [*CLI, "node", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", "--name", name, *extra],
            stdin=stdin,
            stdout=out,
            stderr=out,
            env=env,
        )
    if terminal:
        os.close(slave)
        proc.pty_master = master  # type: ignore[attr-defined]  # closed by stop()
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    master = getattr(proc, "pty_master", -1)
    if master >= 0:
        os.close(master)


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)


def user_env(config: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "CLOUDLESS_DEBUG")}
    env["CLOUDLESS_CONFIG"] = str(config)
    return env


def announced(node_out: Path) -> str:
    return wait_for(
        lambda: "admin client config" in node_out.read_text() and node_out.read_text(),
        30,
        "the bootstrap announcement",
        tolerate=(FileNotFoundError,),
    )


def test_a_first_node_started_on_a_terminal_adds_its_context_beside_the_users_own(tmp_path):
    user_config = tmp_path / "home" / "config.yaml"
    ClientConfig(contexts={"work": make_context("work", "c-work")}, current_context="work").save(user_config)
    env = user_env(user_config)
    data_dir = tmp_path / "node"
    proc = start_node(data_dir, free_port(), LONG_NAME, env, "--voter-stabilization", "1", terminal=True)
    try:
        out = announced(data_dir / "node.out")
        config = client_config.load(user_config)
        cluster_id = client_config.load(data_dir / "admin.yaml").context().cluster_id
        assert sorted(config.contexts) == sorted(["work", cluster_id])
        assert config.current_context == "work"  # the user's current cluster does not change under them
        assert f"added context {cluster_id} to {user_config}" in out
        assert f"cloudless context use {cluster_id}`" in out

        # The way it says works: switch, then the CLI reaches the new cluster with no other setup.
        assert cli("context", "use", cluster_id, env=env).returncode == 0
        wait_for(lambda: json.loads(cli("status", "--json", env=env).stdout)["leader"] == LONG_NAME, 30, "a leader")

        # `nodes --json` (a usage error before) is one document, a list as {"items": [...]}.
        nodes = cli("nodes", "--json", env=env)
        assert nodes.returncode == 0, nodes.stderr
        assert [n["id"] for n in json.loads(nodes.stdout)["items"]] == [LONG_NAME]
        assert [n["id"] for n in yaml.safe_load(cli("nodes", "-o", "yaml", env=env).stdout)["items"]] == [LONG_NAME]
        assert yaml.safe_load(cli("status", "-o", "yaml", env=env).stdout)["leader"] == LONG_NAME

        # Piped tables: plain columns, the long ID and a long value whole.
        value = "v" * 120
        assert cli("vars", "put", "some/key", value, env=env).returncode == 0
        table = cli("nodes", env=env).stdout.splitlines()
        assert table[0].split()[:4] == ["ID", "ADDRESS", "STATE", "ROLE"]
        assert table[1].split()[0] == LONG_NAME and "alive" in table[1].split()
        assert cli("vars", "ls", env=env).stdout.splitlines()[1].split()[:2] == ["some/key", value]
        wide = cli("nodes", "-o", "wide", env=env).stdout.splitlines()
        assert wide[0].split()[:2] == ["ID", "NAME"] and wide[1].split()[:2] == [LONG_NAME, LONG_NAME]

        # Errors against the real cluster: one line, the right code, a document with --json.
        missing = cli("vars", "get", "no/such/key", env=env)
        assert missing.returncode == 3 and missing.stdout == ""
        assert missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
        doc = json.loads(cli("vars", "get", "no/such/key", "--json", env=env).stdout)
        assert doc["error"] == "not_found"
        conflict = cli("vars", "cas", "some/key", "x", "--index", "1", env=env)
        assert conflict.returncode == 4 and len(conflict.stderr.splitlines()) == 1
    finally:
        stop(proc)


def test_an_unattended_first_node_writes_no_client_config_and_says_how_to_use_it(tmp_path):
    user_config = tmp_path / "home" / "config.yaml"
    env = user_env(user_config)
    data_dir = tmp_path / "node"
    proc = start_node(data_dir, free_port(), "first", env, terminal=False)
    try:
        out = announced(data_dir / "node.out")
        assert f"cloudless context import {data_dir / 'admin.yaml'} --use" in out
        assert not user_config.exists()
        # ... and the way it says works.
        imported = cli("context", "import", str(data_dir / "admin.yaml"), "--use", env=env)
        assert imported.returncode == 0, imported.stderr
        wait_for(lambda: json.loads(cli("status", "--json", env=env).stdout)["leader"] == "first", 30, "a leader")
    finally:
        stop(proc)


@pytest.mark.parametrize("flags", [("--no-client-config",), ("--client-config", "{explicit}")])
def test_the_client_config_flags_override_the_terminal_rule(tmp_path, flags):
    user_config = tmp_path / "home" / "config.yaml"
    explicit = tmp_path / "explicit.yaml"
    env = user_env(user_config)
    data_dir = tmp_path / "node"
    args = [f.format(explicit=explicit) for f in flags]
    proc = start_node(data_dir, free_port(), "first", env, *args, terminal=True)
    try:
        announced(data_dir / "node.out")
        assert not user_config.exists()
        if "--client-config" in flags:
            assert client_config.load(explicit).context().cluster_id.startswith("c-")
        else:
            assert not explicit.exists()
    finally:
        stop(proc)
