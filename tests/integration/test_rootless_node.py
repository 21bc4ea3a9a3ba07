"""A node that is not root runs containers with rootless runc.

A root dev node bootstraps the cluster; a second `cloudless node` joins as
`nobody` with a data dir it owns, detects `rootless`, and takes a busybox
workload constrained to it: running, logs, exec through the cluster, the
container's processes owned by `nobody` on the host. A workload publishing a
port is refused for it with the scheduler's reason. Everything the test made
(processes, data dir, cluster) is removed at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cloudless.sandbox.imagebuild import build_busybox_image
from cloudless.scheduler.feasible import ROOTLESS_PORTS
from tests.harness.node_cluster import wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a node as another user"),
]

USER = "nobody"


def cli(bin_: str, *args: str, config: Path | None = None, check: bool = True, timeout: float = 90.0):
    env = dict(os.environ)
    if config is not None:
        env["CLOUDLESS_CONFIG"] = str(config)
    proc = subprocess.run([bin_, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(bin_: str, *args: str, config: Path) -> dict:
    if "--" in args:
        i = args.index("--")
        args = (*args[:i], "--json", *args[i:])
    else:
        args = (*args, "--json")
    return json.loads(cli(bin_, *args, config=config).stdout)


def _hidden_ancestor(path: Path) -> Path | None:
    """The highest ancestor of `path` that other users cannot enter (e.g. /root)."""
    hidden = None
    for parent in reversed(path.parents):
        if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
            hidden = parent
            break
    return hidden


def unprivileged_argv(argv: list[str], home: Path) -> list[str]:
    """Run argv as USER. If the interpreter lives under a directory others cannot
    enter (pyenv under /root), show just the interpreter there, in a private
    mount namespace that dies with the process, so nothing on the host changes."""
    base = Path(sys.base_prefix).resolve()
    hidden = _hidden_ancestor(base)
    run_as = ["setpriv", f"--reuid={USER}", f"--regid={pwd.getpwnam(USER).pw_gid}", "--clear-groups"]
    run_as += ["env", f"HOME={home}", "XDG_RUNTIME_DIR=", *argv]
    if hidden is None:
        return run_as
    script = (
        'set -e; keep=$(mktemp -d); mount --bind "$1" "$keep"; '
        'mount -t tmpfs -o mode=755,size=1m tmpfs "$2"; mkdir -p "$1"; mount --move "$keep" "$1"; '
        'rmdir "$keep"; shift 2; exec "$@"'
    )
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(base), str(hidden), *run_as]


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture
def cluster(tmp_path, cloudless_bin):
    user = pwd.getpwnam(USER)
    base_port = 20000 + random.Random().randrange(0, 20000)
    directory = tmp_path / "cluster"
    up = cli(
        cloudless_bin, "dev", "up", "--nodes", "1", "--dir", str(directory), "--base-port", str(base_port), "--json"
    )
    info = json.loads(up.stdout)
    config = Path(info["config"])
    # Not under tmp_path: pytest's directory is closed to other users.
    home = Path(tempfile.mkdtemp(prefix="cloudless-rootless-"))
    os.chown(home, user.pw_uid, user.pw_gid)
    data = home / "node"
    node = None
    try:
        image = tmp_path / "image"
        layout = build_busybox_image(image, "layout")
        for d in (Path(info["nodes"][0]["dir"]), data):
            cli(
                cloudless_bin,
                "image",
                "import",
                str(layout),
                "--name",
                "busybox:latest",
                "--data-dir",
                str(d),
            )
        for path in [data, *data.rglob("*")]:  # imported as root; the node owns its data dir
            os.lchown(path, user.pw_uid, user.pw_gid)
        token = cli_json(cloudless_bin, "token", "create", "--ttl", "10m", config=config)["token"]
        argv = [sys.executable, "-m", "cloudless", "node", "--data-dir", str(data), "--name", "rootless1"]
        argv += ["--listen", f"127.0.0.1:{base_port + 50}", "--join", info["nodes"][0]["address"]]
        argv += ["--token", token, "--no-client-config"]
        with open(tmp_path / "rootless-node.out", "wb") as out:
            node = subprocess.Popen(
                unprivileged_argv(argv, home),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd=home,
            )
        yield config, data, node
    finally:
        for name in ("sleeper", "web"):
            cli(cloudless_bin, "stop", name, config=config, check=False)
        containers = data / "agent" / "sandbox" / "containers"
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and containers.exists() and any(containers.iterdir()):
            time.sleep(0.3)
        leftovers = sorted(p.name for p in containers.iterdir()) if containers.exists() else []
        if node is not None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=10)
        cli(cloudless_bin, "dev", "down", "--dir", str(directory), check=False)
        # Anything still running from our data dir (a shim, a container) is ours to end.
        strays = processes_mentioning(str(home))
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(home, ignore_errors=True)
        if node is not None:
            print((tmp_path / "rootless-node.out").read_text(errors="replace")[-4000:])
        assert not leftovers, f"containers left behind: {leftovers}"
        assert not strays, f"processes left behind: {strays}"


def test_a_node_that_is_not_root_runs_containers_rootless(cluster, cloudless_bin):
    config, data, node = cluster

    def rootless_member():
        for item in cli_json(cloudless_bin, "nodes", config=config)["items"]:
            if item.get("name", item.get("id")) == "rootless1" and item.get("runtime") == "rootless":
                return item
        assert node.poll() is None, f"rootless node exited {node.returncode}"
        return None

    wait_for(rootless_member, 90, "the rootless node to join and advertise its runtime", interval=0.5)

    cli(
        cloudless_bin,
        "run",
        "busybox:latest",
        "--name",
        "sleeper",
        "--memory",
        "32Mi",
        "--constraint",
        "runtime=rootless",
        "--",
        "sh",
        "-c",
        "while true; do echo up as $(id -u); sleep 1; done",
        config=config,
    )

    def running():
        doc = cli_json(cloudless_bin, "inspect", "sleeper", config=config)
        live = [a for a in doc["allocations"] if a["state"] == "running"]
        return doc if live and live[0]["node"] == "rootless1" else None

    doc = wait_for(running, 90, "the workload running on the rootless node", interval=0.5)
    # The placement says what this node cannot enforce (no delegated cgroup v2 subtree here).
    assert any("rootless node:" in x and "memory" in x and "not enforced" in x for x in doc["explanations"]), doc
    ps = cli_json(cloudless_bin, "ps", config=config)["items"]
    assert [(p["name"], p["running"]) for p in ps] == [("sleeper", 1)]
    logs = wait_for(
        lambda: [
            x for x in cli_json(cloudless_bin, "logs", "sleeper", "--tail", "1", config=config)["items"] if x["text"]
        ],
        90,
        "log lines",
        interval=0.5,
    )
    assert logs[0]["text"] == "up as 0"  # root inside the user namespace
    ex = cli_json(cloudless_bin, "exec", "sleeper", "--", "sh", "-c", "id -u; cat /proc/self/uid_map", config=config)
    uid_inside, mapping = ex["stdout"].strip().split("\n", 1)
    assert ex["exit_code"] == 0 and uid_inside == "0"
    assert mapping.split() == ["0", str(pwd.getpwnam(USER).pw_uid), "1"]  # single-id mapping: no /etc/subuid here
    # On the host the container's init is the unprivileged user, not root.
    (pid_file,) = (data / "agent" / "sandbox" / "containers").glob("*/init.pid")
    status = Path(f"/proc/{pid_file.read_text().strip()}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(pwd.getpwnam(USER).pw_uid)] * 4

    # Ports need a bridge, which needs root: refused for the rootless node, with the reason.
    cli(
        cloudless_bin,
        "run",
        "busybox:latest",
        "--name",
        "web",
        "--port",
        "18080:80",
        "--constraint",
        "runtime=rootless",
        "--",
        "sleep",
        "1000",
        config=config,
    )

    def refused():
        doc = cli_json(cloudless_bin, "inspect", "web", config=config)
        return doc if any(ROOTLESS_PORTS in x for x in doc["explanations"]) else None

    pending = wait_for(refused, 90, "the port workload refused", interval=0.5)
    assert not [a for a in pending["allocations"] if a["state"] == "running"]
