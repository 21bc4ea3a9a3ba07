"""`cloudless context ...` and merging a new cluster's context into the client config."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cloudless.api import client_config
from cloudless.api.client_config import ClientConfig
from cloudless.cli.main import cli
from cloudless.cli.node import announce_bootstrap, client_config_target
from cloudless.errors import Conflict, NotFound, Unavailable

from .test_cli_output import make_context


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    ClientConfig(
        contexts={"home": make_context("home", "c-home"), "work": make_context("work", "c-work")},
        current_context="home",
    ).save(path)
    return path


def ctx(*args: str, config: Path):
    return CliRunner().invoke(cli, ["context", *args, "--config", str(config)])


def test_ls_marks_the_current_context(config):
    result = ctx("ls", config=config)
    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["CURRENT", "NAME", "CLUSTER", "ENDPOINTS"]
    assert rows[1] == ["*", "home", "c-home", "127.0.0.1:1"]
    assert rows[2] == ["work", "c-work", "127.0.0.1:1"]
    doc = json.loads(ctx("ls", "--json", config=config).stdout)
    assert doc["current"] == "home"
    assert [(i["name"], i["current"]) for i in doc["items"]] == [("home", True), ("work", False)]
    assert "key" not in json.dumps(doc).lower().replace("key_pem", "")  # no secrets in the listing
    assert "BEGIN" not in ctx("ls", "-o", "yaml", config=config).stdout
    assert "CERTIFICATE EXPIRES" in ctx("ls", "-o", "wide", config=config).stdout


def test_use_switches_and_current_prints_it(config):
    assert ctx("use", "work", config=config).exit_code == 0
    assert client_config.load(config).current_context == "work"
    assert ctx("current", config=config).stdout == "work\n"
    assert json.loads(ctx("current", "--json", config=config).stdout)["name"] == "work"


def test_use_of_an_unknown_context_is_not_found_and_changes_nothing(config):
    before = config.read_bytes()
    result = ctx("use", "nope", config=config)
    assert result.exit_code == 3 and "no context named 'nope'" in result.stderr
    assert config.read_bytes() == before


def test_rename_moves_the_current_context_with_it(config):
    assert ctx("rename", "home", "laptop", config=config).exit_code == 0
    loaded = client_config.load(config)
    assert list(loaded.contexts) == ["laptop", "work"]  # order kept
    assert loaded.current_context == "laptop"
    assert loaded.context().cluster_id == "c-home"


def test_rename_refusals_change_nothing(config):
    before = config.read_bytes()
    assert ctx("rename", "home", "work", config=config).exit_code == 4  # taken
    assert ctx("rename", "home", "bad name", config=config).exit_code == 2  # invalid
    assert ctx("rename", "nope", "x", config=config).exit_code == 3
    assert config.read_bytes() == before


def test_edits_keep_the_file_private(config):
    config.chmod(0o644)
    ctx("use", "work", config=config)
    assert config.stat().st_mode & 0o777 == 0o600


def test_current_without_one_set_is_not_found(tmp_path):
    path = tmp_path / "c.yaml"
    ClientConfig(contexts={"a": make_context("a")}).save(path)
    assert ctx("current", config=path).exit_code == 3


def test_import_adds_another_configs_context_under_a_free_name(config, tmp_path):
    admin = tmp_path / "admin.yaml"
    ClientConfig(contexts={"home": make_context("home", "c-new")}, current_context="home").save(admin)
    result = CliRunner().invoke(cli, ["context", "import", str(admin), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"name": "home-2", "path": str(config), "current": False, "unchanged": False}
    loaded = client_config.load(config)
    assert loaded.contexts["home"].cluster_id == "c-home"  # the existing one is kept
    assert loaded.contexts["home-2"].cluster_id == "c-new"
    assert loaded.current_context == "home"
    # The same context again changes nothing; an explicit name that is taken is refused rather than renamed.
    again = CliRunner().invoke(cli, ["context", "import", str(admin), "--config", str(config), "--json"])
    assert json.loads(again.stdout)["unchanged"] is True
    other = tmp_path / "other.yaml"
    ClientConfig(contexts={"x": make_context("x", "c-x")}, current_context="x").save(other)
    before = config.read_bytes()
    taken = CliRunner().invoke(cli, ["context", "import", str(other), "--name", "work", "--config", str(config)])
    assert taken.exit_code == 4
    assert config.read_bytes() == before


# -- merge_context -------------------------------------------------------------------------


def test_merge_into_a_missing_file_creates_it_with_the_context_current(tmp_path):
    path = tmp_path / "sub" / "config.yaml"
    merged = client_config.merge_context(path, make_context("c-1", "c-1"))
    assert (merged.name, merged.created_file, merged.made_current, merged.already_present) == ("c-1", True, True, False)
    assert client_config.load(path).context().cluster_id == "c-1"
    assert path.stat().st_mode & 0o777 == 0o600


def test_merge_never_replaces_a_context_and_never_switches_a_set_current_one(config):
    new = make_context("home", "c-other")
    merged = client_config.merge_context(config, new)
    assert (merged.name, merged.made_current, merged.is_current) == ("home-2", False, False)
    again = client_config.merge_context(config, new)  # the same context: nothing to do
    assert (again.name, again.already_present) == ("home-2", True)
    loaded = client_config.load(config)
    assert sorted(loaded.contexts) == ["home", "home-2", "work"]
    assert loaded.current_context == "home"
    with pytest.raises(Conflict):
        client_config.merge_context(config, make_context("work", "c-x"), exact_name=True)


def test_merge_refuses_an_unreadable_config_and_leaves_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("contexts: {broken")
    with pytest.raises(client_config.ConfigError):
        client_config.merge_context(path, make_context("c-1", "c-1"))
    assert path.read_text() == "contexts: {broken"


def test_concurrent_merges_lose_nothing(tmp_path):
    path = tmp_path / "config.yaml"
    contexts = [make_context(f"c-{i}", f"c-{i}") for i in range(8)]
    threads = [threading.Thread(target=client_config.merge_context, args=(path, c)) for c in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(client_config.load(path).contexts) == sorted(c.name for c in contexts)


# -- what the bootstrap node does with it --------------------------------------------------


def test_the_bootstrap_target_is_the_users_config_only_when_asked_or_interactive(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDLESS_CONFIG", str(tmp_path / "user.yaml"))
    assert client_config_target(None, disabled=False, interactive=True) == tmp_path / "user.yaml"
    assert client_config_target(None, disabled=False, interactive=False) is None
    assert client_config_target(tmp_path / "x.yaml", disabled=False, interactive=False) == tmp_path / "x.yaml"
    assert client_config_target(None, disabled=True, interactive=True) is None


def test_announce_bootstrap_merges_and_says_how_to_use_it(config, tmp_path, capsys):
    admin = tmp_path / "node" / "admin.yaml"
    ClientConfig(contexts={"c-9": make_context("c-9", "c-9")}, current_context="c-9").save(admin)
    announce_bootstrap(admin, config)
    err = capsys.readouterr().err
    assert f"admin client config is {admin}" in err
    assert f"added context c-9 to {config}" in err
    assert f"cloudless context use c-9 --config {config}" in err  # the user's current context stays
    assert client_config.load(config).current_context == "home"
    assert "c-9" in client_config.load(config).contexts


def test_announce_bootstrap_without_a_target_only_prints_the_way(tmp_path, capsys):
    admin = tmp_path / "admin.yaml"
    ClientConfig(contexts={"c-9": make_context("c-9", "c-9")}, current_context="c-9").save(admin)
    announce_bootstrap(admin, None)
    assert f"cloudless context import {admin} --use" in capsys.readouterr().err


def test_announce_bootstrap_reports_a_broken_config_and_does_not_raise(tmp_path, capsys):
    admin = tmp_path / "admin.yaml"
    ClientConfig(contexts={"c-9": make_context("c-9", "c-9")}, current_context="c-9").save(admin)
    broken = tmp_path / "user.yaml"
    broken.write_text(yaml.safe_dump({"version": 99}))
    announce_bootstrap(admin, broken)
    err = capsys.readouterr().err
    assert f"could not add it to {broken}" in err and "unsupported config version" in err
    assert yaml.safe_load(broken.read_text()) == {"version": 99}


def test_not_found_is_raised_for_a_missing_context():
    with pytest.raises(NotFound):
        ClientConfig(path=Path("x")).context("nope")


def test_an_editor_holding_the_lock_too_long_is_unavailable_not_a_hang(config, monkeypatch):
    monkeypatch.setattr(client_config, "LOCK_WAIT_S", 0.2)
    fd = os.open(config.with_name(f".{config.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # flock locks are per open file: this one blocks the editor below
        with pytest.raises(Unavailable), client_config.editing(config) as loaded:
            loaded.use("work")
    finally:
        os.close(fd)
    assert client_config.load(config).current_context == "home"
