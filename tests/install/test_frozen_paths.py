"""The sandbox's log shim launched the way a frozen bundle launches it (the hidden
entry argument instead of `python -I -S logs.py`), against real runc, so the
default test run covers what tests/install/test_bundle.py checks with a real
bundle under CLOUDLESS_LONG=1."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import trio

from cloudless import selfexec
from cloudless.sandbox.runc import RuncRuntime
from cloudless.sandbox.runtime import ContainerSpec

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        shutil.which("runc") is None or not os.path.exists("/usr/bin/busybox"), reason="needs runc and busybox-static"
    ),
]


def busybox_rootfs(root: Path) -> str:
    for d in ("bin", "etc", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "echo", "sleep"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    for name in ("hosts", "hostname", "resolv.conf"):
        (root / "etc" / name).write_text("")
    return str(root)


async def test_container_runs_under_the_shim_started_through_the_hidden_entry(tmp_path: Path) -> None:
    shim_argv = [sys.executable, "-m", "cloudless", selfexec.LOG_SHIM_ARG]  # what a bundle runs, unfrozen
    rt = RuncRuntime(tmp_path / "state", shim_argv=shim_argv, command_timeout=30)
    spec = ContainerSpec(
        id="frozen-shim",
        rootfs=busybox_rootfs(tmp_path / "rootfs"),
        args=["sh", "-c", "echo from the shim; echo to stderr >&2; exit 7"],
        network="none",
    )
    try:
        await rt.create(spec)
        started = await rt.start(spec.id)
        shim_pid = int((rt.containers_dir / spec.id / "shim.pid").read_text().split()[0])
        with trio.fail_after(60):
            final = await rt.wait(spec.id)
        assert final.status == "exited" and final.exit_code == 7
        assert started.pid and shim_pid
        logs = await rt.read_logs(spec.id)
        assert [(r.stream, r.text) for r in logs] in (
            [("stdout", "from the shim"), ("stderr", "to stderr")],
            [("stderr", "to stderr"), ("stdout", "from the shim")],
        )
    finally:
        with trio.CancelScope(shield=True):
            for st in await rt.list():
                await rt.delete(st.id)
            await rt.aclose()
    leftover = await trio.run_process(["runc", "--root", str(rt.root), "list", "-q"], capture_stdout=True)
    assert leftover.stdout.strip() == b""
