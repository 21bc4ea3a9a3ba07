import json
import subprocess
import sys

from click.testing import CliRunner

from cloudless.cli.main import cli
from cloudless.errors import Conflict, NotFound, Unavailable


def test_help_lists_command_groups():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "sim" in result.output


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2


def test_error_exit_codes_follow_the_design():
    assert (NotFound("x").exit_code, Conflict("x").exit_code, Unavailable("x").exit_code) == (3, 4, 5)


def test_fail_with_json_prints_one_document():
    code = (
        "from cloudless.cli.output import fail\n"
        "from cloudless.errors import Conflict\n"
        "fail(Conflict('index moved', key='a'), as_json=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 4
    doc = json.loads(proc.stdout)
    assert doc == {"error": "conflict", "message": "index moved", "context": {"key": "a"}}


def test_every_listed_command_resolves_and_has_help():
    import click

    from cloudless.cli.main import COMMANDS, LazyGroup

    group = cli
    assert isinstance(group, LazyGroup)
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        assert isinstance(command, click.Command), name
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
    assert {"node", "dev", "status", "vars", "token", "events", "image", "sim"} <= set(group.list_commands(None))
    assert set(group.list_commands(None)) <= set(COMMANDS)
