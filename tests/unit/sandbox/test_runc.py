"""RuncRuntime pieces that need neither root nor runc: host detection, bundle preparation, state files."""

import json
import os

import pytest

from cloudless.sandbox.logs import process_start_time
from cloudless.sandbox.runc import RuncRuntime, _process_alive, _read_inside, detect_cgroups
from cloudless.sandbox.runtime import (
    ContainerExists,
    ContainerNotFound,
    ContainerSpec,
    InvalidContainerSpec,
    SandboxError,
)


def test_detect_cgroups_v1_with_and_without_swap_accounting_and_v2(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    assert detect_cgroups(str(v2)).version == 2
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    assert detect_cgroups(str(v1)).version == 1 and not detect_cgroups(str(v1)).swap_accounting
    (v1 / "memory" / "memory.memsw.limit_in_bytes").write_text("0\n")
    assert detect_cgroups(str(v1)).swap_accounting


def test_image_files_are_read_without_following_symlinks_out_of_the_rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    secret = tmp_path / "host-passwd"
    secret.write_text("host:x:0:0::/:/bin/sh\n")
    os.symlink(str(secret), root / "etc" / "passwd")
    os.symlink("../../host-passwd", root / "etc" / "group")
    assert _read_inside(str(root), "etc/passwd") == ""
    assert _read_inside(str(root), "etc/group") == ""
    (root / "etc" / "hosts").write_text("inside\n")
    assert _read_inside(str(root), "etc/hosts") == "inside\n"


def test_process_liveness_checks_start_time_against_pid_reuse():
    me = os.getpid()
    assert _process_alive(me, process_start_time(me))
    assert not _process_alive(me, process_start_time(me) + 1)
    assert not _process_alive(2**22 + 12345, 0)


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    return str(root)


async def test_create_writes_spec_bundle_and_etc_files_and_resolves_the_user(tmp_path, rootfs):
    rt = RuncRuntime(tmp_path / "state", runc_binary="/nonexistent/runc")
    s = ContainerSpec(id="web", rootfs=rootfs, args=["serve"], user="app", network="none", hostname="h1",
                      memory_bytes=64 << 20, labels={"a": "b"})  # fmt: skip
    state = await rt.create(s)
    assert state.status == "created" and state.labels == {"a": "b"}
    cdir = tmp_path / "state" / "containers" / "web"
    config = json.loads((cdir / "bundle" / "config.json").read_text())
    assert config["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [2000]}
    assert config["linux"]["cgroupsPath"].endswith("/web")
    assert config["linux"]["resources"]["memory"]["limit"] == 64 << 20
    mounts = {m["destination"]: m["source"] for m in config["mounts"] if m["type"] == "bind"}
    assert mounts["/etc/hostname"] == str(cdir / "etc" / "hostname")
    assert (cdir / "etc" / "hostname").read_text() == "h1\n"
    assert "localhost" in (cdir / "etc" / "hosts").read_text()
    assert await rt.inspect("web") == s
    assert (await rt.state("web")).status == "created"
    assert [x.id for x in await rt.list()] == ["web"]
    with pytest.raises(ContainerExists):
        await rt.create(s)
    await rt.delete("web")
    assert not cdir.exists()
    with pytest.raises(ContainerNotFound):
        await rt.state("web")


async def test_failed_create_leaves_nothing_behind(tmp_path, rootfs):
    rt = RuncRuntime(tmp_path / "state", runc_binary="/nonexistent/runc")
    with pytest.raises(SandboxError):
        await rt.create(ContainerSpec(id="a", rootfs=str(tmp_path / "missing"), args=["x"], network="none"))
    with pytest.raises(InvalidContainerSpec):
        await rt.create(ContainerSpec(id="b", rootfs=rootfs, args=["x"], user="nobody", network="none"))
    assert os.listdir(tmp_path / "state" / "containers") == []


async def test_start_rebuilds_a_torn_bundle_before_running(tmp_path, rootfs):
    rt = RuncRuntime(tmp_path / "state", runc_binary="/nonexistent/runc")
    await rt.create(ContainerSpec(id="c", rootfs=rootfs, args=["x"], network="none"))
    cfg = tmp_path / "state" / "containers" / "c" / "bundle" / "config.json"
    cfg.write_text('{"ociVersion": "1.0')  # torn by a crash
    assert not rt._bundle_intact("c")
    rt._write_bundle(await rt.inspect("c"))
    assert rt._bundle_intact("c") and json.loads(cfg.read_text())["process"]["args"] == ["x"]


async def test_half_made_directories_are_orphans_not_containers(tmp_path, rootfs):
    rt = RuncRuntime(tmp_path / "state", runc_binary="/nonexistent/runc")
    (tmp_path / "state" / "containers" / "half-made").mkdir()
    assert rt.orphans() == ["half-made"]
    assert await rt.list() == []
