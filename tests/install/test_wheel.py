"""The wheel as a user installs it: built from this checkout, installed into a
fresh venv (dependencies from the package index), run from another directory.
Catches what only works in the editable dev venv (imports the dev venv happens
to have made, files missing from the wheel, the entry point, the log shim)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cloudless import __version__
from tests.install.installed import ROOT, bootstrap_status_shutdown, check_commands, clean_env, run


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=600,
    )
    (built,) = out.glob("cloudless-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel (and its dependencies) in it; its bin dir."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=900,
        env=clean_env(),
    )
    return venv / "bin"


def test_wheel_holds_the_package_and_entry_point_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "cloudless/sandbox/logs.py" in names  # the log shim is run by path
    assert "cloudless/selfexec.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/"))]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "cloudless = cloudless.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_is_the_wheel_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    proc = run([str(installed / "python"), "-c", "import cloudless; print(cloudless.__file__)"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(installed.parent)


def test_installed_cli_lists_and_loads_every_command(installed: Path, tmp_path: Path) -> None:
    exe = [str(installed / "cloudless")]
    version = run([*exe, "--version"], tmp_path)
    assert version.returncode == 0 and __version__ in version.stdout
    check_commands(exe, tmp_path)


def test_installed_log_shim_runs_standalone(installed: Path, tmp_path: Path) -> None:
    """The shim as the sandbox launches it (isolated, no site packages) from the installed
    files: it must get as far as its usage check, importing nothing outside the stdlib."""
    prog = "import json; from cloudless import selfexec; print(json.dumps(selfexec.log_shim_argv()))"
    got = run([str(installed / "python"), "-c", prog], tmp_path)
    assert got.returncode == 0, got.stderr
    argv = json.loads(got.stdout)
    assert argv[0] == str(installed / "python") and Path(argv[-1]).is_relative_to(installed.parent)
    usage = run([*argv, "not-shim"], tmp_path)
    assert usage.returncode == 2 and "usage: logs.py shim" in usage.stderr
    bad = run([*argv, "shim", "--no-such-option", "x"], tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_installed_node_bootstraps_and_answers_status(installed: Path, tmp_path: Path) -> None:
    doc = bootstrap_status_shutdown([str(installed / "cloudless")], tmp_path)
    assert doc["voters"] == ["node1"]
    assert [m["name"] for m in doc["members"]] == ["node1"]


@pytest.mark.skipif(shutil.which("pipx") is None, reason="pipx not installed (Debian package pipx)")
def test_pipx_install_from_checkout(tmp_path: Path) -> None:
    """README's `pipx install .`, into a private PIPX_HOME."""
    env = {"PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin")}
    got = run(["pipx", "install", str(ROOT)], tmp_path, timeout=900, **env)
    assert got.returncode == 0, got.stdout + got.stderr
    exe = [str(tmp_path / "bin" / "cloudless")]
    version = run([*exe, "--version"], tmp_path)
    assert version.returncode == 0 and __version__ in version.stdout
    check_commands(exe, tmp_path)
