"""The single-file bundle (scripts/bundle) as a gateway runs it: built from this
checkout into a temporary directory, started by path from another one. A frozen program has no
`python -m` and no script files, so this is where self-invocation (dev clusters
spawning nodes, the sandbox spawning the log shim) and native extensions prove
themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from cloudless import __version__
from cloudless.cli.main import COMMANDS
from tests.harness.node_cluster import wait_for
from tests.install.installed import ROOT, bootstrap_status_shutdown, check_commands, run

MAX_BYTES = 60 * 1024 * 1024

# On 2 shared cores the build takes 1-2.2 minutes (plus about one for the build venv
# on a clean clone) and the module 1.6-4: so only with CLOUDLESS_LONG=1. By default
# tests/unit/test_selfexec.py and test_frozen_paths.py cover the frozen code paths.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "cloudless"
    subprocess.run([str(ROOT / "scripts" / "bundle"), str(out)], check=True, timeout=1800, stdout=subprocess.DEVNULL)
    return out


def test_bundle_is_one_file_within_the_size_limit(bundle: Path) -> None:
    assert bundle.is_file() and os.access(bundle, os.X_OK)
    assert bundle.stat().st_size <= MAX_BYTES


def test_bundle_loads_every_native_extension(bundle: Path, tmp_path: Path) -> None:
    got = run([str(bundle), "__cloudless-native-check"], tmp_path)
    report = json.loads(got.stdout)
    assert got.returncode == 0, report
    # pyfastcdc is the one that would silently fall back to pure Python.
    assert report["pyfastcdc.cy.fastcdc"].endswith(".so") and "pyfastcdc" not in report
    for path in report.values():
        assert "/_MEI" in path, path  # from the bundle, not from some Python on this machine


def test_bundle_lists_every_command_and_loads_each_command_module(bundle: Path, tmp_path: Path) -> None:
    version = run([str(bundle), "--version"], tmp_path)
    assert version.returncode == 0 and __version__ in version.stdout
    # One command per module: each start of a one-file bundle unpacks it (seconds), and
    # a module that is in the bundle loads all of its commands.
    one_per_module = {module: name for name, (module, _, _) in sorted(COMMANDS.items())}
    check_commands([str(bundle)], tmp_path, only=sorted(one_per_module.values()))


def test_bundle_node_bootstraps_and_answers_status(bundle: Path, tmp_path: Path) -> None:
    doc = bootstrap_status_shutdown([str(bundle)], tmp_path)
    assert doc["voters"] == ["node1"]


def test_bundle_runs_a_seeded_simulation(bundle: Path, tmp_path: Path) -> None:
    got = run([str(bundle), "sim", "raft", "--seeds", "1", "--nodes", "3"], tmp_path, timeout=300)
    assert got.returncode == 0, got.stdout + got.stderr


def _dicts(doc: object) -> list[dict]:
    """Every object in a JSON document (the `--json` shapes are being unified elsewhere)."""
    if isinstance(doc, dict):
        return [doc, *(d for v in doc.values() for d in _dicts(v))]
    if isinstance(doc, list):
        return [d for v in doc for d in _dicts(v)]
    return []


def _cleanup_sandbox(state_dir: Path, under: Path) -> None:
    """Stop and delete whatever containers are left in `state_dir`, remove its bridge and
    rules, and unmount anything left under `under` (only what this test made)."""
    from cloudless.sandbox.runc import RuncRuntime

    async def clean() -> None:
        rt = RuncRuntime(state_dir, command_timeout=20)
        try:
            for c in await rt.list():
                await rt.stop(c.id, grace=1)
                await rt.delete(c.id)
            await rt.network.remove_bridge()
        finally:
            await rt.aclose()

    if state_dir.exists():
        trio.run(clean)
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f]
    for target in reversed(mounts):
        if target.startswith(str(under) + "/"):
            subprocess.run(["umount", "-l", target], check=False, timeout=30)


@pytest.mark.root
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
def test_bundle_dev_cluster_runs_a_container_through_a_node_restart(bundle: Path, tmp_path: Path) -> None:
    """`dev up` spawns its node from the bundle; `run` starts busybox under the bundle's log
    shim, which outlives the node (and its unpacked directory) and is adopted after `dev up`."""
    from cloudless.sandbox.imagebuild import build_busybox_image

    exe = [str(bundle)]
    cluster = tmp_path / "c"
    config = cluster / "config.yaml"
    state_dir = cluster / "node1" / "agent" / "sandbox"
    build_busybox_image(tmp_path / "image", "layout")

    def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return run([*exe, *args], tmp_path, timeout=timeout, CLOUDLESS_CONFIG=str(config))

    def replica_says(text: str) -> bool:
        got = cli("logs", "hello", "--tail", "3")
        return got.returncode == 0 and text in got.stdout

    try:
        up = cli("dev", "up", "--nodes", "1", "--dir", str(cluster), timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        imported = cli("image", "import", str(tmp_path / "image" / "layout"), "--name", "busybox:latest",
                       "--data-dir", str(cluster / "node1"), "--json")  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        started = cli("run", "busybox:latest", "--name", "hello", "--memory", "32Mi", "--cpu", "100m",
                      "--", "sh", "-c", "while true; do echo hello from the bundle; sleep 1; done")  # fmt: skip
        assert started.returncode == 0, started.stderr
        wait_for(lambda: replica_says("hello from the bundle"), 120, "the replica's output", tolerate=())

        # The node goes; the shim stays and keeps writing the container's log.
        down = cli("dev", "down", "--dir", str(cluster))
        assert down.returncode == 0, down.stderr
        (log_dir,) = state_dir.glob("containers/*/logs")
        size = sum(p.stat().st_size for p in log_dir.iterdir())
        wait_for(lambda: sum(p.stat().st_size for p in log_dir.iterdir()) > size, 30, "the log to grow", tolerate=())

        up = cli("dev", "up", "--nodes", "1", "--dir", str(cluster), timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr

        def running() -> bool:
            got = cli("ps", "--json")
            return got.returncode == 0 and any(
                w.get("name") == "hello" and w.get("running") == 1 for w in _dicts(json.loads(got.stdout))
            )

        wait_for(running, 60, "the adopted replica", tolerate=())
        (container,) = state_dir.glob("containers/*")
        assert not (container / "exit.json").exists()  # the same container, adopted, never restarted
        # Its shim is the bundle itself, alive although the node that spawned it (and the
        # directory that node unpacked) is gone.
        shim_pid = int((container / "shim.pid").read_text().split()[0])  # "<pid> <start time>"
        assert "__cloudless-log-shim" in Path(f"/proc/{shim_pid}/cmdline").read_text()

        stopped = cli("stop", "hello")
        assert stopped.returncode == 0, stopped.stderr
        # The shim reaps the container and records its exit (the agent may then delete the directory).
        wait_for(lambda: not Path(f"/proc/{shim_pid}").exists(), 60, "the shim to finish", tolerate=())
        assert (container / "exit.json").exists() or not container.exists()
    finally:
        cli("dev", "down", "--dir", str(cluster))
        _cleanup_sandbox(state_dir, tmp_path)
