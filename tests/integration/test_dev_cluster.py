"""`cloudless dev up/down`, `exec` and `logs` on a real 3-node dev cluster
(real node processes, and runc containers when run as root).

In file order, on one cluster: dev up returns only once every node is up and
the voter set complete; flags it cannot apply to a running cluster are
refused; exec streams (first line before the command ends), passes stdin,
gives a real tty, returns the command's exit code and keeps memory bounded
on 200 MB of output; logs --tail follows docker; exec/logs refuse node
identities; the README's sequence (kill -9 the leader → a new leader; dev up
restarts it); dev down leaves no container, mount, bridge, netns or rule.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import trio

from cloudless.agent.messages import ExecEvent, ExecExit, ExecRequest, LogLine
from cloudless.api import client_config
from cloudless.api.client import ClusterClient
from cloudless.api.workloads import WorkloadExec, WorkloadLogs
from cloudless.errors import CloudlessError
from cloudless.pki.credentials import Credentials
from cloudless.sandbox.network import BridgeConfig
from cloudless.sandbox.rootfs import mounts_under

HAVE_CONTAINERS = os.geteuid() == 0 and shutil.which("runc") is not None and os.path.exists("/usr/bin/busybox")
needs_containers = pytest.mark.skipif(not HAVE_CONTAINERS, reason="needs root, runc and busybox-static")

TICKER = "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.1; done"


def cli(bin_: str, *args: str, config: Path | None = None, check: bool = True, timeout: float = 180.0, **kw):
    env = dict(os.environ)
    if config is not None:
        env["CLOUDLESS_CONFIG"] = str(config)
    proc = subprocess.run([bin_, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}\n{proc.stderr}")
    return proc


def status(bin_: str, config: Path) -> dict:
    return json.loads(cli(bin_, "status", "--json", config=config).stdout)


def wait_until(what: str, predicate, timeout: float = 90.0, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, CloudlessError, json.JSONDecodeError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def node_pids(directory: Path) -> dict[str, int]:
    return {
        p.name: int((p / "node.pid").read_text()) for p in sorted(directory.glob("node*")) if (p / "node.pid").exists()
    }


def bridge_of(node_dir: Path) -> BridgeConfig:
    return BridgeConfig.for_node((node_dir / "agent" / "sandbox").resolve())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    bin_ = shutil.which("cloudless") or os.path.join(os.path.dirname(sys.executable), "cloudless")
    tmp = tmp_path_factory.mktemp("dev")
    directory = tmp / "cluster"
    base = 20000 + random.Random().randrange(0, 20000)
    up = cli(bin_, "dev", "up", "--nodes", "3", "--dir", str(directory), "--base-port", str(base), "--json")
    info = json.loads(up.stdout)
    config = Path(info["config"])
    try:
        if HAVE_CONTAINERS:
            image = tmp / "image"
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    (
                        "from pathlib import Path; from cloudless.sandbox.imagebuild import build_busybox_image;"
                        f" build_busybox_image(Path({str(image)!r}), 'layout')"
                    ),
                ],
                check=True,
                timeout=120,
            )
            for node in info["nodes"]:
                cli(
                    bin_,
                    "image",
                    "import",
                    str(image / "layout"),
                    "--name",
                    "busybox:latest",
                    "--data-dir",
                    node["dir"],
                )
            cli(bin_, "run", "busybox:latest", "--name", "shell", "--", "sleep", "100000", config=config)
            # publishing a port puts it on its node's bridge, which dev down must remove
            cli(
                bin_,
                "run",
                "busybox:latest",
                "--name",
                "ticker",
                "--port",
                "8080",
                "--",
                "sh",
                "-c",
                TICKER,
                config=config,
            )

            def running():
                doc = json.loads(cli(bin_, "ps", "--json", config=config).stdout)["items"]
                return {w["name"] for w in doc if w["running"] == w["desired"] == 1} >= {"shell", "ticker"}

            wait_until("the workloads running", running, timeout=180)
        yield bin_, directory, config, info, up
    finally:
        cli(bin_, "dev", "down", "--dir", str(directory), check=False)


# ---------------------------------------------------------------- dev up


def test_dev_up_returns_with_every_node_up_a_leader_and_the_full_voter_set(cluster):
    bin_, _directory, config, info, up = cluster
    assert info["leader"]
    doc = status(bin_, config)  # right away: nothing left to wait for
    alive = {m["name"] for m in doc["members"] if m["state"] == "alive"}
    assert alive == {"node1", "node2", "node3"}
    assert sorted(doc["voters"]) == sorted(m["id"] for m in doc["members"])  # 3 nodes: 3 voters
    assert doc["leader"]
    assert up.stderr == ""  # piped: no progress output


def test_dev_up_on_a_running_cluster_refuses_flags_it_cannot_apply_and_changes_nothing(cluster):
    bin_, directory, _config, _info, _ = cluster
    pids = node_pids(directory)
    plans = {p.name: (p / "dev.json").read_text() for p in directory.glob("node*")}
    for args, words in [
        (["--s3-port", "1"], "--s3-port 1: node1 is running"),
        (["--nodes", "2"], "--nodes 2: the cluster has 3 nodes"),
        (["--base-port", "1500"], "--base-port 1500"),
        (["--voter-stabilization", "9"], "--voter-stabilization 9"),
    ]:
        proc = cli(bin_, "dev", "up", "--dir", str(directory), *args, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert words in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr
    assert node_pids(directory) == pids
    assert {p.name: (p / "dev.json").read_text() for p in directory.glob("node*")} == plans
    # The same flags it was made with are fine, and nothing restarts.
    again = cli(bin_, "dev", "up", "--dir", str(directory), "--nodes", "3", "--json")
    assert json.loads(again.stdout)["leader"]
    assert node_pids(directory) == pids


# ---------------------------------------------------------------- exec


@needs_containers
def test_exec_streams_output_as_it_is_produced(cluster):
    bin_, _, config, _, _ = cluster
    env = {**os.environ, "CLOUDLESS_CONFIG": str(config)}
    script = "rm -f /tmp/go; echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second"
    proc = subprocess.Popen(
        [bin_, "exec", "shell", "--", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout.readline() == b"first\n"
        assert proc.poll() is None  # the command is still waiting for /tmp/go: the line came before its end
        cli(bin_, "exec", "shell", "--", "touch", "/tmp/go", config=config)
        out, err = proc.communicate(timeout=120)
        assert out == b"second\n" and proc.returncode == 0, err
    finally:
        proc.kill()
        proc.wait()


@needs_containers
def test_exec_exits_with_the_commands_exit_code_and_keeps_stderr_apart(cluster):
    bin_, _, config, _, _ = cluster
    proc = cli(bin_, "exec", "shell", "--", "sh", "-c", "echo out; echo oops >&2; exit 42", config=config, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (42, "out\n", "oops\n")
    assert cli(bin_, "exec", "shell/0", "--", "true", config=config, check=False).returncode == 0
    doc = json.loads(
        cli(bin_, "exec", "shell", "--json", "--", "sh", "-c", "echo j; exit 3", config=config, check=False).stdout
    )
    assert doc == {"exit_code": 3, "stdout": "j\n", "stderr": ""}
    # through a follower: it forwards the call, with the caller's proof, to the leader
    doc = status(bin_, config)
    follower = next(m["address"] for m in doc["members"] if m["id"] != doc["leader"])
    via = cli(bin_, "exec", "--endpoint", follower, "shell", "--", "sh", "-c", "exit 9", config=config, check=False)
    assert via.returncode == 9, via.stderr
    assert "line" in cli(bin_, "logs", "--endpoint", follower, "ticker", "--tail", "1", config=config).stdout
    missing = cli(bin_, "exec", "nosuch", "--", "true", config=config, check=False)
    assert missing.returncode == 3 and "nosuch" in missing.stderr


@needs_containers
def test_exec_i_streams_stdin_to_the_command(cluster):
    bin_, _, config, _, _ = cluster
    proc = cli(
        bin_, "exec", "-i", "shell", "--", "sh", "-c", "tr a-z A-Z; echo end", config=config, input="hello\nworld\n"
    )
    assert proc.stdout == "HELLO\nWORLD\nend\n"
    # without -i the command reads nothing
    proc = cli(bin_, "exec", "shell", "--", "sh", "-c", "cat; echo end", config=config, input="ignored\n")
    assert proc.stdout == "end\n"


@needs_containers
def test_exec_it_gives_the_command_a_real_terminal_with_our_window_size(cluster):
    bin_, _, config, _, _ = cluster
    master, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 31, 97, 0, 0))
    before = termios.tcgetattr(terminal)
    env = {**os.environ, "CLOUDLESS_CONFIG": str(config)}
    # Not an interactive shell: its line editor asks the terminal for the cursor position and
    # waits for an answer only a terminal emulator gives.
    # (runc sizes the terminal just after the process starts: the size is asked for until it shows)
    script = (
        "tty; [ -t 0 ] && echo IS-A-TTY; read line; echo got-$line;"
        ' while read line && [ "$line" != stop ]; do stty size; done; exit 7'
    )
    proc = subprocess.Popen(
        [bin_, "exec", "-it", "shell", "--", "sh", "-c", script], stdin=terminal, stdout=terminal, stderr=terminal,
        env=env, start_new_session=True,
    )  # fmt: skip
    seen = bytearray()

    def read_until(needle: bytes) -> None:
        deadline = time.monotonic() + 120
        while needle not in seen:
            assert time.monotonic() < deadline, f"no {needle!r} in {bytes(seen)!r}"
            if select.select([master], [], [], 0.5)[0]:
                seen.extend(os.read(master, 65536))

    try:
        read_until(b"IS-A-TTY")
        assert b"/dev/pts/" in seen
        assert termios.tcgetattr(terminal)[3] & termios.ECHO == 0  # ours is in raw mode meanwhile
        os.write(master, b"abc\r")  # the remote terminal turns CR into NL for `read`
        read_until(b"got-abc")
        deadline = time.monotonic() + 120
        while b"31 97" not in seen:
            assert time.monotonic() < deadline, f"no size in {bytes(seen)!r}"
            os.write(master, b"\r")
            if select.select([master], [], [], 0.5)[0]:
                seen.extend(os.read(master, 65536))
        os.write(master, b"stop\r")
        assert proc.wait(timeout=120) == 7
        assert termios.tcgetattr(terminal) == before  # and restored
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(terminal)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def run_measured(argv: list[str], env: dict) -> tuple[int, int, int]:
    """(exit status, bytes on stdout, the process's peak RSS in KiB), stdout read and dropped as it comes."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    count = 0

    def drain():
        nonlocal count
        while data := proc.stdout.read1(1 << 16):
            count += len(data)

    reader = threading.Thread(target=drain)
    reader.start()
    _, wstatus, usage = os.wait4(proc.pid, 0)
    reader.join(timeout=60)
    proc.returncode = os.waitstatus_to_exitcode(wstatus)
    return proc.returncode, count, usage.ru_maxrss


@needs_containers
def test_exec_of_200_mb_of_output_streams_with_bounded_memory_everywhere(cluster):
    bin_, directory, config, _, _ = cluster
    env = {**os.environ, "CLOUDLESS_CONFIG": str(config)}
    nodes = node_pids(directory)
    before = {name: peak_rss_kib(pid) for name, pid in nodes.items()}
    _, _, cli_baseline = run_measured([bin_, "exec", "shell", "--", "head", "-c", "1000", "/dev/zero"], env)
    code, count, cli_peak = run_measured([bin_, "exec", "shell", "--", "head", "-c", "200000000", "/dev/zero"], env)
    assert (code, count) == (0, 200_000_000)
    growth = {name: peak_rss_kib(pid) - before[name] for name, pid in nodes.items()}
    print(f"peak RSS growth (KiB): nodes {growth}, cli {cli_peak - cli_baseline}")
    assert all(g < 16 * 1024 for g in growth.values()), growth
    assert cli_peak - cli_baseline < 16 * 1024


# ---------------------------------------------------------------- logs


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"line (\d+)", text)]


def follow(bin_: str, config: Path, *args: str, lines: int) -> list[int]:
    env = {**os.environ, "CLOUDLESS_CONFIG": str(config)}
    proc = subprocess.Popen(
        [bin_, "logs", "ticker", "-f", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        got = []
        while len(got) < lines:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            got += numbers(line.decode())
        return got
    finally:
        proc.kill()
        proc.wait()


@needs_containers
def test_logs_tail_n_prints_the_last_n_lines_and_all_without_it(cluster):
    bin_, _, config, _, _ = cluster
    wait_until("a few log lines", lambda: len(numbers(cli(bin_, "logs", "ticker", config=config).stdout)) >= 5)
    everything = numbers(cli(bin_, "logs", "ticker", config=config).stdout)
    assert everything[:3] == [1, 2, 3] and everything == list(range(1, len(everything) + 1))
    last3 = numbers(cli(bin_, "logs", "ticker", "--tail", "3", config=config).stdout)
    assert len(last3) == 3 and last3 == list(range(last3[0], last3[0] + 3)) and last3[0] >= everything[-1] - 2
    assert cli(bin_, "logs", "ticker", "--tail", "0", config=config).stdout == ""


@needs_containers
def test_logs_follow_tail_0_prints_only_new_lines(cluster):
    bin_, _, config, _, _ = cluster
    newest_before = numbers(cli(bin_, "logs", "ticker", "--tail", "1", config=config).stdout)[-1]
    got = follow(bin_, config, "--tail", "0", lines=3)
    assert got[0] > newest_before  # nothing old replayed (it started at line 1)
    assert got == list(range(got[0], got[0] + 3))


@needs_containers
def test_logs_follow_tail_n_prints_the_last_n_then_new_lines_without_gap_or_repeat(cluster):
    bin_, _, config, _, _ = cluster
    newest_before = numbers(cli(bin_, "logs", "ticker", "--tail", "1", config=config).stdout)[-1]
    got = follow(bin_, config, "--tail", "2", lines=5)
    assert got[0] >= newest_before - 1
    assert got == list(range(got[0], got[0] + 5))


# ---------------------------------------------------------------- who may


def node_client(directory: Path, info: dict) -> ClusterClient:
    creds = Credentials.load(directory / "node2" / "tls")
    config = client_config.load(directory / "config.yaml").context()
    context = client_config.Context(
        "as-node", config.cluster_id, [n["address"] for n in info["nodes"]], creds.ca_pem, creds.cert_pem, creds.key_pem
    )
    return ClusterClient(context, timeout=10)


def test_exec_and_logs_refuse_node_identities_and_agent_calls_refuse_clients(cluster):
    _, directory, config, info, _ = cluster

    async def main():
        as_node = node_client(directory, info)
        as_admin = ClusterClient(client_config.load(config).context(), timeout=10)
        try:
            refusals = []
            for client, method, request, item in [
                (as_node, "workloads.exec", WorkloadExec("shell", ("true",)), ExecEvent),
                (as_admin, "agent.exec", ExecRequest("shell-0-x", ("true",)), ExecEvent),
            ]:
                with pytest.raises(CloudlessError) as info_:
                    async with client.duplex(method, request, item=item) as call:
                        await call.end()
                        async for event in call:
                            assert not isinstance(event, ExecExit), f"{method} ran for {client.context.name}"
                refusals.append(info_.value.code)
            with pytest.raises(CloudlessError) as info_:
                async with as_node.stream("workloads.logs", WorkloadLogs("ticker"), item=LogLine) as lines:
                    async for _ in lines:
                        raise AssertionError("logs served to a node identity")
            refusals.append(info_.value.code)
            assert refusals == ["permission_denied"] * 3
        finally:
            await as_node.aclose()
            await as_admin.aclose()

    trio.run(main)


# ---------------------------------------------------------------- the README's sequence


def test_kill_9_of_the_leader_leaves_a_quorum_that_elects_another_and_dev_up_restarts_it(cluster):
    bin_, directory, config, _, _ = cluster
    cli(bin_, "vars", "put", "greeting", "hello", config=config)
    old = status(bin_, config)["leader"]
    name = next(m["name"] for m in status(bin_, config)["members"] if m["id"] == old)
    os.kill(int((directory / name / "node.pid").read_text()), signal.SIGKILL)

    def new_leader():
        leader = status(bin_, config)["leader"]
        return leader if leader and leader != old else None

    wait_until("a new leader", new_leader)
    assert json.loads(cli(bin_, "vars", "get", "greeting", "--json", config=config).stdout)["value"] == "hello"
    cli(bin_, "dev", "up", "--dir", str(directory))  # restarts it and waits for the full voter set again
    doc = status(bin_, config)
    assert {m["name"] for m in doc["members"] if m["state"] == "alive"} == {"node1", "node2", "node3"}
    assert len(doc["voters"]) == 3


def test_dev_up_waiting_for_a_node_that_never_comes_up_gives_up_with_exit_5(cluster):
    bin_, directory, config, _, _ = cluster
    pid = int((directory / "node3" / "node.pid").read_text())
    os.kill(pid, signal.SIGSTOP)  # running (dev up will not restart it) but answering nothing
    try:

        def node3_down():
            return any(m["name"] == "node3" and m["state"] != "alive" for m in status(bin_, config)["members"])

        wait_until("the others to see node3 down", node3_down)
        proc = cli(bin_, "dev", "up", "--dir", str(directory), "--timeout", "3", check=False)
        assert proc.returncode == 5, (proc.stdout, proc.stderr)
        said = " ".join(proc.stderr.split())
        assert "not ready after 3s" in said and "2/3 nodes up" in said, said
    finally:
        os.kill(pid, signal.SIGCONT)
    cli(bin_, "dev", "up", "--dir", str(directory))  # back to ready once it answers again


# ---------------------------------------------------------------- dev down (last)


@needs_containers
def test_dev_down_removes_the_clusters_containers_mounts_bridges_and_rules(cluster):
    bin_, directory, _config, _, _ = cluster
    node_dirs = sorted(directory.glob("node[0-9]*"))
    runc_roots = [d / "agent" / "sandbox" / "runc" for d in node_dirs]

    def containers() -> list[str]:
        found = []
        for root in runc_roots:
            out = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True)
            found += out.stdout.split()
        return found

    assert containers(), "the test needs containers to remove"
    assert mounts_under(directory), "the test needs container mounts to remove"
    bridges = [bridge_of(d) for d in node_dirs]
    assert any(os.path.exists(f"/sys/class/net/{b.bridge}") for b in bridges)
    doc = json.loads(cli(bin_, "dev", "down", "--dir", str(directory), "--json").stdout)
    assert sorted(doc["stopped"]) == ["node1", "node2", "node3"]
    assert containers() == []
    assert mounts_under(directory) == []
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    for b in bridges:
        assert not os.path.exists(f"/sys/class/net/{b.bridge}")
        assert f'"{b.tag}"' not in rules and f"{b.tag}:" not in rules and f"comment {b.tag} " not in rules
        assert not [n for n in netns if n.startswith(b.tag + "-")]
    assert not any((d / "node.pid").exists() for d in node_dirs)
