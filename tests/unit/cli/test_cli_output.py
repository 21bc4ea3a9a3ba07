"""The CLI's one error path, its output formats and its tables (cloudless/cli/output.py, cli/main.py)."""

from __future__ import annotations

import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from datetime import UTC, datetime, timedelta
from fcntl import ioctl
from pathlib import Path
from typing import ClassVar

import click
import pytest
import yaml
from click.testing import CliRunner

from cloudless.api.client_config import ClientConfig, Context
from cloudless.cli import output
from cloudless.cli.main import cli
from cloudless.errors import NotFound
from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.identity import Identity

CLI = [sys.executable, "-m", "cloudless"]
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def make_context(name: str, cluster_id: str = "c-test", endpoint: str = UNREACHABLE) -> Context:
    now = datetime.now(UTC)
    ca = ClusterCA.create(cluster_id, now)
    admin = issue_credentials(ca, Identity(cluster_id, "client", "admin"), now, lifetime=timedelta(days=1))
    return Context(name, cluster_id, [endpoint], admin.ca_pem, admin.cert_pem, admin.key_pem)


@pytest.fixture
def config(tmp_path) -> Path:
    """A valid client config whose only endpoint refuses connections."""
    path = tmp_path / "config.yaml"
    ClientConfig(contexts={"dev": make_context("dev")}, current_context="dev").save(path)
    return path


def invoke(*args: str, config: Path | None = None):
    env = {"CLOUDLESS_CONFIG": str(config)} if config else {}
    return CliRunner().invoke(cli, list(args), env=env)


def run(*args: str, config: Path | None = None, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "CLOUDLESS_CONFIG", "CLOUDLESS_DEBUG")}
    if config:
        env["CLOUDLESS_CONFIG"] = str(config)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, stdin=stdin, timeout=60)


def assert_one_error_line(stderr: str, contains: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and contains in lines[0], stderr
    assert "Traceback" not in stderr


# -- errors ------------------------------------------------------------------------------


def test_a_bad_port_is_a_usage_error_on_one_line_not_a_traceback(config):
    # The message holds `[HOST:]CONTAINER[/tcp|udp]`: read as rich markup it raised MarkupError.
    proc = run("run", "busybox", "--port", "abc", config=config)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "port: 'abc': expected [HOST:]CONTAINER[/tcp|udp], e.g. 8080:80")


def test_error_text_is_never_read_as_markup(config, tmp_path):
    missing = tmp_path / "[red]web[/red] [bold]spec[/bold].yaml"
    proc = run("apply", "-f", str(missing), config=config)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"cannot read {missing}")


def test_with_json_the_error_is_the_one_document_on_stdout(config):
    proc = run("status", "--json", config=config)
    assert proc.returncode == 5
    doc = json.loads(proc.stdout)
    assert doc["error"] == "unavailable" and UNREACHABLE in doc["message"]
    assert proc.stderr == ""


def test_with_yaml_the_error_is_a_yaml_document(config):
    result = invoke("vars", "get", "k", "-o", "yaml", config=config)
    assert result.exit_code == 5
    assert yaml.safe_load(result.stdout)["error"] == "unavailable"


def test_usage_errors_are_one_line_with_exit_2():
    for args in (["--bogus"], ["status", "--bogus"], ["status", "-o", "xml"], ["vars", "get", "a b"], ["nope"]):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert_one_error_line(proc.stderr, "")


def test_json_and_another_output_format_disagree(config):
    result = invoke("status", "--json", "-o", "yaml", config=config)
    assert result.exit_code == 2
    assert "disagree" in json.loads(result.stdout)["message"]


def test_exit_codes_follow_the_error_type(config, tmp_path):
    assert invoke("status", config=tmp_path / "absent.yaml").exit_code == 3  # no config: not found
    assert invoke("status", "--context", "other", config=config).exit_code == 3
    assert invoke("status", config=config).exit_code == 5  # nothing reachable


def test_an_unexpected_exception_is_one_line_exit_1(config, monkeypatch):
    def broken(path=None):
        raise RuntimeError("boom [bold]x[/bold]\nsecond line")

    monkeypatch.setattr("cloudless.api.client_config.load", broken)
    result = invoke("status", config=config)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_one_error_line(result.stderr, "error: internal error: RuntimeError: boom [bold]x[/bold] second line")


def test_the_error_inside_an_exception_group_decides_the_exit_code(capsys):
    code = output.report(ExceptionGroup("tasks", [ValueError("x"), NotFound("no such workload")]))
    assert code == 3
    assert capsys.readouterr().err == "error: no such workload\n"


def test_control_characters_from_outside_are_escaped():
    assert output.one_line("a\x1b[31mred\nnext\x07") == "a\\x1b[31mred next\\x07"


# -- nodes, -o -------------------------------------------------------------------------


def test_nodes_accepts_json_and_output_options(config):
    # `nodes --json` was a usage error (the option lived on `nodes ls` only); now it reaches the cluster.
    for args in (["nodes", "--json"], ["nodes", "-o", "json"], ["nodes", "ls", "--json"]):
        result = invoke(*args, config=config)
        assert result.exit_code == 5, (args, result.output)
        assert json.loads(result.stdout)["error"] == "unavailable"
    assert invoke("nodes", "--help").exit_code == 0
    assert invoke("nodes", "bogus").exit_code == 2


def test_read_commands_take_every_output_format():
    for command in (
        ["status"],
        ["nodes", "ls"],
        ["vars", "get"],
        ["vars", "ls"],
        ["ps"],
        ["events"],
        ["image", "ls"],
        ["blob", "ls"],
        ["s3", "keys", "ls"],
        ["context", "ls"],
        ["context", "current"],
    ):
        help_text = invoke(*command, "--help").output
        assert "-o, --output [json|yaml|wide]" in help_text and "--json" in help_text, command


def test_lists_are_items_documents(capsys):
    output.OutputFormat("json").emit_list([{"a": 1}], prefix="p/")
    assert json.loads(capsys.readouterr().out) == {"items": [{"a": 1}], "prefix": "p/"}
    output.OutputFormat("yaml").emit_list([{"a": 1}])
    assert yaml.safe_load(capsys.readouterr().out) == {"items": [{"a": 1}]}


# -- tables ------------------------------------------------------------------------------

LONG_ID = "node-" + "x" * 70 + "-end"


class Row:
    id = LONG_ID
    state = "running"
    extra = "only-wide"
    columns: ClassVar = [
        output.Column("ID", lambda r: r.id),
        output.Column("STATE", lambda r: r.state),
        output.Column("EXTRA", lambda r: r.extra, wide_only=True),
    ]


def test_a_piped_table_is_plain_columns_with_ids_whole(capsys):
    output.print_table(Row.columns, [Row(), Row()])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE"]
    assert lines[1].split() == [LONG_ID, "running"]
    assert lines[0].index("STATE") == lines[1].index("running")  # aligned
    output.print_table(Row.columns, [Row()], wide=True)
    assert capsys.readouterr().out.splitlines()[1].split() == [LONG_ID, "running", "only-wide"]


TABLE_PROGRAM = (
    "from cloudless.cli import output\n"
    f"class R: id = {LONG_ID!r}; state = 'running'\n"
    "output.print_table([output.Column('ID', lambda r: r.id), output.Column('STATE', lambda r: r.state)], [R()])\n"
)


def test_piped_output_of_a_real_process_is_not_cut_at_80_columns():
    code = TABLE_PROGRAM + "output.stdout.print('token ' + 'y' * 150)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = proc.stdout.splitlines()
    assert lines[1].split() == [LONG_ID, "running"]
    assert lines[2] == "token " + "y" * 150


def test_on_a_terminal_the_table_uses_the_full_width():
    code = TABLE_PROGRAM
    master, slave = pty.openpty()
    ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(30)
    os.close(master)
    text = b"".join(chunks).decode()
    assert LONG_ID in text  # whole on one line, not folded at 80 columns
    assert "…" not in text


# -- completion --------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_the_script_for_each_shell(shell):
    result = invoke("completion", shell)
    assert result.exit_code == 0
    assert "_CLOUDLESS_COMPLETE" in result.output and "cloudless" in result.output


def test_the_completion_script_completes_commands_and_subcommands():
    env = {**os.environ, "_CLOUDLESS_COMPLETE": "bash_complete", "COMP_WORDS": "cloudless cont", "COMP_CWORD": "1"}
    proc = subprocess.run(CLI, capture_output=True, text=True, env=env, timeout=60)
    assert "plain,context" in proc.stdout.splitlines()
    env.update(COMP_WORDS="cloudless context re", COMP_CWORD="2")
    proc = subprocess.run(CLI, capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.splitlines() == ["plain,rename"]


def test_completion_refuses_an_unknown_shell():
    result = invoke("completion", "tcsh")
    assert result.exit_code == 2


def test_click_usage_hint_names_the_command():
    error = output.as_cloudless_error(click.UsageError("Missing argument 'KEY'.", ctx=None))
    assert (error.exit_code, error.code, error.message) == (2, "invalid", "Missing argument 'KEY'")


def test_ctrl_c_exits_130_without_a_traceback(config, monkeypatch):
    def interrupted(path=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("cloudless.api.client_config.load", interrupted)
    result = invoke("status", config=config)
    assert result.exit_code == 130
    assert "Traceback" not in result.output and result.stdout == ""


def _leaf_commands(command: click.Command, path: tuple[str, ...] = ()):
    if isinstance(command, click.Group):
        for name in command.list_commands(click.Context(command)):
            yield from _leaf_commands(command.get_command(click.Context(command), name), (*path, name))
    else:
        yield " ".join(path), command


def test_docs_cli_md_covers_every_command_and_its_output_formats():
    docs = (Path(__file__).parents[3] / "docs" / "cli.md").read_text()
    for path, command in _leaf_commands(cli):
        name = re.compile(rf"`{re.escape(path)}[` ]")
        rows = [line for line in docs.splitlines() if line.startswith("|") and name.search(line.split("|")[1])]
        assert rows, f"docs/cli.md has no table row for `cloudless {path}`"
        takes_o = any("--output" in getattr(p, "opts", ()) for p in command.params)
        row = rows[0]
        assert takes_o == ("-o json" in row), f"docs/cli.md: the -o of `{path}` ({takes_o}) is not as documented"


def test_a_group_alone_prints_its_help():
    for args in ([], ["vars"], ["context"]):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.stderr)
        assert result.stdout.startswith("Usage: ") and "Commands:" in result.stdout
        assert result.stderr == ""


def test_local_store_commands_report_errors_in_the_format_asked(tmp_path):
    # `image ls` on a data dir it cannot use: the error in the -o format, like the cluster commands.
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    for args, parse in ((["-o", "yaml"], yaml.safe_load), (["--json"], json.loads)):
        result = CliRunner().invoke(cli, ["image", "ls", "--data-dir", str(blocked), *args])
        assert result.exit_code != 0
        assert parse(result.stdout)["error"], result.output
    text = CliRunner().invoke(cli, ["image", "ls", "--data-dir", str(blocked)])
    assert text.stdout == "" and text.stderr.startswith("error: ")
