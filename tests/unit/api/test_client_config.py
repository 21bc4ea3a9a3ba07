import os
import stat

import pytest

from cloudless.api.client_config import ClientConfig, ConfigError, Context, load, parse_endpoint
from cloudless.errors import NotFound


def sample():
    ctx = Context("dev", "c-1", ["127.0.0.1:7001", "[::1]:7002"], b"CA\n", b"CERT\n", b"KEY\n")
    return ClientConfig(contexts={"dev": ctx}, current_context="dev")


def test_round_trip_and_private_mode(tmp_path):
    path = tmp_path / "c" / "config.yaml"
    sample().save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = load(path)
    assert loaded.context() == sample().context()


def test_environment_variable_selects_the_file(tmp_path, monkeypatch):
    path = tmp_path / "x.yaml"
    sample().save(path)
    monkeypatch.setenv("CLOUDLESS_CONFIG", str(path))
    assert load().context().cluster_id == "c-1"


def test_missing_file_is_not_found_with_a_hint(tmp_path):
    with pytest.raises(NotFound, match="dev up"):
        load(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "text, match",
    [
        ("- a\n- b\n", "mapping"),
        ("contexts: [{name: x}]\n", "missing field"),
        (
            "contexts: [{name: x, cluster-id: c, endpoints: ['nohost'], ca: a, certificate: b, key: c}]\n",
            "invalid endpoint",
        ),
        ("version: 9\n", "unsupported"),
        ("a: [\n", "YAML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load(path)


def test_unknown_context_is_not_found(tmp_path):
    path = tmp_path / "c.yaml"
    sample().save(path)
    with pytest.raises(NotFound):
        load(path).context("prod")


def test_parse_endpoint_accepts_ipv6_and_rejects_bad_ports():
    assert parse_endpoint("[::1]:80") == ("::1", 80)
    with pytest.raises(ConfigError):
        parse_endpoint("host:0")
    with pytest.raises(ConfigError):
        parse_endpoint("host:99999")
