"""The node process for real: separate `cloudless node` processes on loopback,
driven through the CLI exactly as a user would (DESIGN.md §7)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness.node_cluster import (
    CLI,
    NodeProcess,
    bootstrap,
    cli,
    cli_json,
    free_port,
    join,
    status,
    token,
    wait_for,
)


@pytest.fixture
def nodes(tmp_path):
    started: list[NodeProcess] = []

    def make(name: str, *extra: str) -> NodeProcess:
        node = NodeProcess(tmp_path / name, free_port(), name, *extra)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


def create_cluster(nodes) -> tuple[NodeProcess, Path]:
    """node1, bootstrapped, and its admin config (most tests start from this)."""
    first = nodes("node1")
    return first, bootstrap(first)


def test_bootstrap_writes_admin_config_and_serves_status(nodes):
    first, config = create_cluster(nodes)
    doc = status(config)
    assert set(doc) == {"cluster_id", "leader", "term", "commit_index", "voters", "learners", "members"}
    assert doc["voters"] == ["node1"] and doc["learners"] == []
    (member,) = doc["members"]
    assert {k: member[k] for k in ("id", "name", "address", "state", "role")} == {
        "id": "node1",
        "name": "node1",
        "address": first.address,
        "state": "alive",
        "role": "voter",
    }
    assert oct(os.stat(config).st_mode & 0o777) == "0o600"
    # node.log keeps the fields a log call passes (observability/logging.py).
    log_lines = [json.loads(line) for line in (first.data_dir / "logs" / "node.log").read_text().splitlines()]
    elected = [r for r in log_lines if r["event"] == "raft.became_leader"]
    assert elected and elected[-1]["node"] == "node1" and elected[-1]["term"] == doc["term"]


def test_vars_semantics_and_exit_codes(nodes):
    _, config = create_cluster(nodes)
    put = cli_json("vars", "put", "app/color", "blue", config=config)
    assert put["key"] == "app/color" and put["value"] == "blue" and put["index"] > 0
    assert cli_json("vars", "get", "app/color", config=config) == put
    conflict = cli("vars", "cas", "app/color", "red", "--index", str(put["index"] - 1), "--json", config=config)
    assert conflict.returncode == 4, conflict.stdout + conflict.stderr
    assert json.loads(conflict.stdout)["error"] == "conflict"
    swapped = cli_json("vars", "cas", "app/color", "red", "--index", str(put["index"]), config=config)
    assert swapped["value"] == "red" and swapped["index"] > put["index"]
    created = cli_json("vars", "cas", "new", "x", "--index", "0", config=config)
    assert created["value"] == "x"
    assert cli("vars", "cas", "new", "y", "--index", "0", config=config).returncode == 4
    assert [v["key"] for v in cli_json("vars", "ls", "app/", config=config)["items"]] == ["app/color"]
    cli("vars", "rm", "app/color", config=config, check=True)
    missing = cli("vars", "get", "app/color", "--json", config=config)
    assert missing.returncode == 3 and json.loads(missing.stdout)["error"] == "not_found"
    assert cli("vars", "get", "bad key!", config=config).returncode == 2


def test_join_grow_to_three_voters_survive_leader_kill_and_rejoin(nodes):
    first, config = create_cluster(nodes)
    second = nodes("node2")
    join(config, first, second, nodes("node3"))
    wait_for(lambda: status(config)["voters"] == ["node1", "node2", "node3"], 60, "three voters")
    acked = {f"k{i}": cli_json("vars", "put", f"k{i}", f"v{i}", config=config)["value"] for i in range(5)}

    first.kill9()
    survivors = f"{second.address}"

    def new_leader():
        doc = status(config, survivors)
        return doc["leader"] in ("node2", "node3") and doc

    wait_for(new_leader, 30, "a new leader")
    # The client fails over across the endpoints in its config; only node1 is
    # listed in the admin config, so name a survivor explicitly.
    for key, value in acked.items():
        assert cli_json("vars", "get", key, "--endpoint", survivors, config=config)["value"] == value
    cli_json("vars", "put", "after", "failover", "--endpoint", survivors, config=config)

    first.start()  # same data dir: resumes the same identity and rejoins
    wait_for(
        lambda: {m["id"]: m["state"] for m in status(config, survivors)["members"]}.get("node1") == "alive",
        40,
        "node1 back alive",
    )
    assert cli_json("vars", "get", "after", "--endpoint", first.address, config=config)["value"] == "failover"


@pytest.mark.parametrize("case", ["forged", "used_up", "expired", "wrong_role", "malformed"])
def test_token_misuse_is_refused_and_changes_nothing(nodes, case):
    first, config = create_cluster(nodes)
    if case == "forged":
        good = token(config)
        parts = good.split(".")
        parts[2] = ("a" if parts[2][0] != "a" else "b") + parts[2][1:]
        bad = ".".join(parts)
    elif case == "used_up":
        bad = token(config, "--uses", "1")
        nodes("ok").start("--join", first.address, "--token", bad)
        wait_for(lambda: "ok" in [m["id"] for m in status(config)["members"]], 30, "first use to succeed")
    elif case == "expired":
        bad = token(config, "--ttl", "1s")
        time.sleep(1.5)
    elif case == "wrong_role":
        bad = token(config, "--role", "admin")
    else:
        bad = "cl1.not-a-token"
    joiner = nodes("intruder")
    proc = subprocess.run(
        [
            *CLI,
            "node",
            "--data-dir",
            str(joiner.data_dir),
            "--listen",
            joiner.address,
            "--name",
            "intruder",
            "--join",
            first.address,
            "--token",
            bad,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    expected = {
        "forged": "does not match",
        "used_up": "used",
        "expired": "expired",
        "wrong_role": "grants admin",
        "malformed": "not a bootstrap token",
    }[case]
    assert expected in proc.stderr, proc.stderr
    assert "intruder" not in [m["id"] for m in status(config)["members"]]
    assert not (joiner.data_dir / "node.json").exists()


def test_removed_node_is_revoked_cluster_wide(nodes):
    import trio

    from cloudless.errors import CloudlessError
    from cloudless.pki.credentials import Credentials
    from cloudless.pki.errors import PeerRejected
    from cloudless.pki.revocation import RevocationList
    from cloudless.pki.verify import PeerVerifier
    from cloudless.transport.tls import TlsCarrier

    first, config = create_cluster(nodes)
    second = nodes("node2").start("--join", first.address, "--token", token(config))
    wait_for(
        lambda: any(m["id"] == "node2" and m["state"] == "alive" for m in status(config)["members"]), 30, "node2 joined"
    )
    second.stop()
    cli("nodes", "rm", "node2", config=config, check=True)
    assert "node2" not in status(config)["voters"] + status(config)["learners"]
    creds = Credentials.load(second.data_dir / "tls")

    async def connect_as_removed_node():
        verifier = PeerVerifier(creds.ca_certificate, RevocationList(), creds.identity.cluster_id)
        carrier = TlsCarrier(creds, verifier)
        host, port = first.address.split(":")
        conn = await carrier.connect((host, int(port)))
        await conn.aclose()

    def refused():
        try:
            trio.run(connect_as_removed_node)
        except PeerRejected as exc:
            return exc.reason == "revoked"
        except CloudlessError:
            return False
        return False

    wait_for(refused, 15, "the removed node's certificate to be refused as revoked")


def test_dev_up_and_down_from_a_clean_state(tmp_path):
    directory = tmp_path / "c"
    base = free_port()
    proc = cli("dev", "up", "--nodes", "3", "--dir", str(directory), "--base-port", str(base), "--json", timeout=120)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = json.loads(proc.stdout)
        assert len(doc["nodes"]) == 3 and doc["leader"]
        config = directory / "config.yaml"
        for i in (1, 2, 3):
            assert (directory / f"node{i}" / "node.pid").exists()
        wait_for(lambda: len(status(config)["voters"]) == 3, 60, "three voters")
        cli_json("vars", "put", "hello", "world", config=config)
        # Running it again restarts what is not running, and nothing else.
        pid2 = int((directory / "node2" / "node.pid").read_text())
        os.kill(pid2, signal.SIGKILL)
        again = cli("dev", "up", "--nodes", "3", "--dir", str(directory), "--json", timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert int((directory / "node2" / "node.pid").read_text()) != pid2
        assert cli_json("vars", "get", "hello", config=config)["value"] == "world"
    finally:
        down = cli("dev", "down", "--dir", str(directory), "--json", timeout=60)
    assert down.returncode == 0
    assert sorted(json.loads(down.stdout)["stopped"]) == ["node1", "node2", "node3"]
    for i in (1, 2, 3):
        assert not (directory / f"node{i}" / "node.pid").exists()


def test_metrics_endpoint_requires_a_cluster_certificate(nodes):
    import ssl
    import urllib.error
    import urllib.request

    metrics_port = free_port()
    first = nodes("node1", "--metrics-listen", f"127.0.0.1:{metrics_port}")
    bootstrap(first)
    tls = first.data_dir / "tls"
    context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    context.check_hostname = False
    url = f"https://127.0.0.1:{metrics_port}/metrics"
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(url, context=context, timeout=5).read()  # no client certificate
    context.load_cert_chain(str(tls / "cert.pem"), str(tls / "key.pem"))
    body = urllib.request.urlopen(url, context=context, timeout=5).read().decode()
    assert "cloudless_raft_is_leader 1.0" in body
    assert 'cloudless_gossip_members{state="alive"} 1.0' in body
    assert "cloudless_raft_syncs_total" in body


def test_autopilot_prefers_mains_and_replaces_a_dead_voter(nodes):
    """Issue 5: a phone on battery is not chosen while a mains node is available,
    and becomes a voter only when nothing better exists."""
    first, config = create_cluster(nodes)
    second = nodes("node2")
    phone = nodes("phone", "--power", "battery", "--battery", "60", "--network", "wifi")
    join(config, first, second, phone, nodes("node4"))
    wait_for(lambda: status(config)["voters"] == ["node1", "node2", "node4"], 60, "three mains voters")
    members = {m["id"]: m for m in status(config)["members"]}
    assert (members["phone"]["power"], members["phone"]["battery_pct"], members["phone"]["network"]) == (
        "battery",
        60.0,
        "wifi",
    )
    assert members["phone"]["role"] != "voter"

    second.kill9()
    wait_for(
        lambda: sorted(status(config)["voters"]) == ["node1", "node4", "phone"],
        60,
        "the phone to replace the dead voter",
    )
    events = cli_json("events", "--last", "200", config=config)["items"]
    reasons = [e for e in events if e["kind"] == "autopilot.remove" and e["node"] == "node2"]
    assert reasons and "dead" in reasons[0]["message"]


def test_sigterm_hands_leadership_away_and_leaves_gracefully(nodes):
    first, config = create_cluster(nodes)
    second = nodes("node2")
    join(config, first, second, nodes("node3"))
    wait_for(lambda: len(status(config)["voters"]) == 3, 60, "three voters")
    started = time.monotonic()
    first.stop()
    doc = wait_for(
        lambda: (d := status(config, second.address))["leader"] in ("node2", "node3") and d, 20, "new leader"
    )
    handoff_s = time.monotonic() - started
    states = {m["id"]: m["state"] for m in doc["members"]}
    # A graceful leave is "left", not a failure detected later as "dead".
    wait_for(
        lambda: {m["id"]: m["state"] for m in status(config, second.address)["members"]}["node1"] == "left",
        20,
        f"node1 to be marked left (was {states.get('node1')})",
    )
    assert first.proc.returncode == 0, first.output()
    assert handoff_s < 15, handoff_s


def test_node_certificates_renew_before_they_expire(nodes, monkeypatch):
    from cloudless.pki.credentials import Credentials

    monkeypatch.setenv("CLOUDLESS_NODE_CERT_LIFETIME_S", "30")
    first, config = create_cluster(nodes)
    second = nodes("node2").start("--join", first.address, "--token", token(config))
    wait_for(lambda: (second.data_dir / "tls" / "cert.pem").exists(), 30, "node2 enrolled")
    original = Credentials.load(second.data_dir / "tls")
    assert (original.not_after - original.not_before).total_seconds() <= 95  # 30 s + the one-minute backdate
    wait_for(lambda: Credentials.load(second.data_dir / "tls").serial != original.serial, 60, "node2 to renew")
    renewed = Credentials.load(second.data_dir / "tls")
    assert renewed.identity == original.identity and renewed.not_after > original.not_after
    # Past the original certificate's expiry the node still works with its new one.
    time.sleep(max(0.0, original.not_after.timestamp() - time.time()) + 1)
    wait_for(
        lambda: any(m["id"] == "node2" and m["state"] == "alive" for m in status(config)["members"]), 20, "node2 alive"
    )
    cli_json("vars", "put", "after-renewal", "ok", "--endpoint", second.address, config=config)
