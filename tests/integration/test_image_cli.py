"""`cloudless image import|ls|rm|prune` as a user runs them (subprocess, real store)."""

import json
import os
import subprocess

import pytest

from cloudless.sandbox.imagebuild import TarBuilder, build_busybox_image, build_image, busybox_image


def run(cloudless_bin, data_dir, *args):
    env = {**os.environ, "CLOUDLESS_DATA_DIR": str(data_dir)}
    return subprocess.run([cloudless_bin, "image", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("form", ["layout", "docker-save"])
def test_import_then_ls_json_lists_the_image(tmp_path, cloudless_bin, form):
    path = build_busybox_image(tmp_path / "src", form)
    out = run(cloudless_bin, tmp_path / "node", "import", str(path), "--json")
    assert out.returncode == 0, out.stderr
    [img] = json.loads(out.stdout)["items"]
    assert img["id"] == busybox_image().config_digest
    listed = run(cloudless_bin, tmp_path / "node", "ls", "--json")
    doc = json.loads(listed.stdout)  # exactly one JSON document
    assert [i["names"] for i in doc["items"]] == [["docker.io/library/busybox:latest"]]
    human = run(cloudless_bin, tmp_path / "node", "ls")
    assert "docker.io/library/busybox" in human.stdout and img["id"][7:19] in human.stdout


def test_data_dir_option_overrides_the_environment(tmp_path, cloudless_bin):
    path = build_busybox_image(tmp_path / "src", "layout")
    out = run(cloudless_bin, tmp_path / "env-dir", "import", str(path), "--data-dir", str(tmp_path / "flag-dir"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "flag-dir/images/index.json").exists()
    assert not (tmp_path / "env-dir/images/index.json").exists()


def test_import_errors_exit_with_design_codes_and_leave_nothing(tmp_path, cloudless_bin):
    node = tmp_path / "node"
    missing = run(cloudless_bin, node, "import", str(tmp_path / "absent.tar"), "--json")
    assert missing.returncode == 3 and json.loads(missing.stdout)["error"] == "not_found"
    evil = build_image(tmp_path / "evil", [TarBuilder().file("../../x", b"x").bytes()], form="docker-save")
    bad = run(cloudless_bin, node, "import", str(evil))
    assert bad.returncode == 2 and "escapes" in bad.stderr
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"junk")
    assert run(cloudless_bin, node, "import", str(junk)).returncode == 2
    assert list((node / "images/blobs/sha256").iterdir()) == []
    assert list((node / "images/tmp").iterdir()) == []


def test_rm_and_prune(tmp_path, cloudless_bin):
    node = tmp_path / "node"
    run(cloudless_bin, node, "import", str(build_busybox_image(tmp_path / "a", "layout")))
    run(
        cloudless_bin,
        node,
        "import",
        str(build_image(tmp_path / "b", [TarBuilder().file("v", b"1").bytes()], name="localhost/app:1")),
    )
    run(
        cloudless_bin,
        node,
        "import",
        str(build_image(tmp_path / "c", [TarBuilder().file("v", b"2").bytes()], name="localhost/app:1")),
    )
    assert run(cloudless_bin, node, "rm", "busybox").returncode == 0
    assert run(cloudless_bin, node, "rm", "busybox").returncode == 3
    pruned = json.loads(run(cloudless_bin, node, "prune", "--json").stdout)
    assert len(pruned["removed_images"]) == 1 and pruned["freed_bytes"] > 0
    names = [i["names"] for i in json.loads(run(cloudless_bin, node, "ls", "--json").stdout)["items"]]
    assert names == [["localhost/app:1"]]
