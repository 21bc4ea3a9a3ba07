"""cloudless/selfexec.py: how Cloudless runs itself again, installed or frozen.

The frozen branches are checked here by setting `sys.frozen` as PyInstaller does;
tests/install/test_bundle.py (CLOUDLESS_LONG=1) runs a real bundle. The hidden
log-shim entry is exercised through `python -m cloudless`, which takes the same
path as a bundle, and tests/install/test_frozen_paths.py runs containers through it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cloudless import selfexec
from cloudless.cli.main import COMMANDS, cli


def test_not_frozen_runs_the_module_and_the_shim_script_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.delenv("PYINSTALLER_RESET_ENVIRONMENT", raising=False)
    assert selfexec.cloudless_argv() == [sys.executable, "-m", "cloudless"]
    assert "PYINSTALLER_RESET_ENVIRONMENT" not in selfexec.cloudless_env()
    python, *flags, script = selfexec.log_shim_argv()
    assert python == sys.executable and flags == ["-I", "-S"] and script.endswith("cloudless/sandbox/logs.py")


def test_frozen_runs_the_executable_itself_and_long_lived_children_unpack_their_own_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert selfexec.cloudless_argv() == [sys.executable]
    assert selfexec.cloudless_env()["PYINSTALLER_RESET_ENVIRONMENT"] == "1"
    assert selfexec.log_shim_argv() == [sys.executable, selfexec.LOG_SHIM_ARG]


def test_frozen_children_get_the_library_path_the_program_was_started_with(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEIxyz:/opt/lib")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/opt/lib")
    selfexec.restore_library_path()
    assert os.environ["LD_LIBRARY_PATH"] == "/opt/lib" and "LD_LIBRARY_PATH_ORIG" not in os.environ
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEIxyz")  # the caller had none
    selfexec.restore_library_path()
    assert "LD_LIBRARY_PATH" not in os.environ


def test_not_frozen_leaves_the_library_path_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/lib")
    selfexec.restore_library_path()
    assert os.environ["LD_LIBRARY_PATH"] == "/opt/lib"


def test_every_command_in_the_table_is_listed_and_loads() -> None:
    import click

    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        assert isinstance(cli.get_command(ctx, name), click.Command), name
    assert cli.get_command(ctx, "no-such-command") is None


def test_hidden_shim_entry_runs_logs_py_as_main_without_its_module_imports() -> None:
    prog = (
        "import sys\n"
        "from cloudless import selfexec\n"
        "try:\n"
        "    selfexec.run_hidden_entry(['cloudless', selfexec.LOG_SHIM_ARG, 'not-shim'])\n"
        "except SystemExit as e:\n"
        "    print(e.code, 'trio' in sys.modules)\n"
    )
    got = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert got.stdout.split() == ["2", "False"], got.stderr  # usage error; the shim imported no trio
    assert "usage: logs.py shim" in got.stderr


def test_hidden_entries_are_reached_through_the_cli_entry_point() -> None:
    shim = subprocess.run(
        [sys.executable, "-m", "cloudless", selfexec.LOG_SHIM_ARG], capture_output=True, text=True, timeout=60
    )
    assert shim.returncode == 2 and "usage: logs.py shim" in shim.stderr
    native = subprocess.run(
        [sys.executable, "-m", "cloudless", selfexec.NATIVE_CHECK_ARG], capture_output=True, text=True, timeout=60
    )
    report = json.loads(native.stdout)
    assert native.returncode == 0, report
    assert set(report) == set(selfexec.NATIVE_MODULES)
    assert all(path.endswith(".so") for path in report.values())


def test_ordinary_arguments_are_left_to_the_cli() -> None:
    selfexec.run_hidden_entry(["cloudless", "status"])  # returns: not a hidden entry
    selfexec.run_hidden_entry(["cloudless"])
