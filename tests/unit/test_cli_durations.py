"""Duration flags read `10s`/`15m`/seconds and refuse the rest as usage errors (exit 2)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from cloudless.cli.durations import Duration
from cloudless.cli.main import cli


@click.command()
@click.option("--wait", type=Duration(1, 3600), default="10s")
def probe(wait: float) -> None:
    click.echo(repr(wait))


@pytest.mark.parametrize("args, seconds", [([], 10.0), (["--wait", "1m30s"], 90.0), (["--wait", "2.5"], 2.5)])
def test_duration_flag_parses_units_and_seconds(args, seconds):
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 0, result.output
    assert float(result.output) == seconds


@pytest.mark.parametrize("value, why", [("2h", "must be ≤ 1h"), ("500ms", "must be ≥ 1s"), ("soon", "not a duration")])
def test_duration_flag_refuses_with_a_usage_error(value, why):
    result = CliRunner().invoke(probe, ["--wait", value])
    assert result.exit_code == 2
    assert "--wait" in result.output and why in result.output, result.output


def test_node_voter_stabilization_takes_a_duration():
    result = CliRunner().invoke(cli, ["node", "--voter-stabilization", "2h", "--data-dir", "/nonexistent/x"])
    assert result.exit_code == 2
    assert "must be ≤ 1h" in result.output, result.output


def test_token_ttl_takes_a_duration():
    result = CliRunner().invoke(cli, ["token", "create", "--ttl", "31d"])
    assert result.exit_code == 2
    assert "must be ≤ 30d" in result.output, result.output
