"""Images through the blob store on a real 3-node cluster (issue 7 item 6):
busybox imported on ONE node only; `cloudless run` 3 replicas spread over 3
nodes all reach running because the other two nodes fetch the image's blobs
from their peers (no registry exists here), and their logs say so."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")]


def cli(
    bin_: str, *args: str, config: Path | None = None, check: bool = True, timeout: float = 90.0
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if config is not None:
        env["CLOUDLESS_CONFIG"] = str(config)
    proc = subprocess.run([bin_, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}\n{proc.stderr}")
    return proc


def running(doc: dict) -> list[dict]:
    return [a for a in doc["allocations"] if a["desired"] == "run" and a["state"] == "running"]


def test_image_imported_on_one_node_runs_on_all_three(tmp_path):
    bin_ = shutil.which("cloudless") or os.path.join(os.path.dirname(sys.executable), "cloudless")
    directory = tmp_path / "cluster"
    base = 20000 + random.Random().randrange(0, 20000)
    up = cli(
        bin_, "dev", "up", "--nodes", "3", "--dir", str(directory), "--base-port", str(base), "--json", timeout=120
    )
    info = json.loads(up.stdout)
    config = Path(info["config"])
    try:
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
        source = info["nodes"][0]
        cli(
            bin_,
            "image",
            "import",
            str(image / "layout"),
            "--name",
            "busybox:latest",
            "--data-dir",
            source["dir"],
            "--json",
        )
        others = info["nodes"][1:]
        for node in others:
            assert json.loads(cli(bin_, "image", "ls", "--data-dir", node["dir"], "--json").stdout)["items"] == []

        cli(
            bin_,
            "run",
            "busybox:latest",
            "--name",
            "peer",
            "--replicas",
            "3",
            "--memory",
            "32Mi",
            "--json",
            "--",
            "sh",
            "-c",
            "while true; do sleep 1; done",
            config=config,
        )
        deadline = time.monotonic() + 60
        doc: dict = {}
        while time.monotonic() < deadline:
            doc = json.loads(cli(bin_, "inspect", "peer", "--json", config=config).stdout)
            if len(running(doc)) == 3:
                break
            time.sleep(0.5)
        allocations = [(a["node"], a["state"], a["message"]) for a in doc.get("allocations", [])]
        assert len(running(doc)) == 3, f"not all replicas running: {allocations}"
        assert sorted(a["node"] for a in running(doc)) == sorted(n["name"] for n in info["nodes"])

        for node in others:
            [record] = json.loads(cli(bin_, "image", "ls", "--data-dir", node["dir"], "--json").stdout)["items"]
            assert "docker.io/library/busybox:latest" in json.dumps(record)
            log = (Path(node["dir"]) / "node.out").read_text(errors="replace")
            assert "image.fetched_from_peers" in log, f"{node['name']} did not log fetching from peers"
        assert "image.published" in (Path(source["dir"]) / "node.out").read_text(errors="replace")
    finally:
        cli(bin_, "stop", "peer", config=config, check=False)
        containers = list(directory.glob("node*/agent/sandbox/containers"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(any(c.iterdir()) for c in containers if c.exists()):
            time.sleep(0.3)
        cli(bin_, "dev", "down", "--dir", str(directory), check=False)
