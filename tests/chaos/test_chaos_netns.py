"""Self-tests of the chaos harness's hosts and faults (real namespaces, iptables)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import trio

from cloudless.errors import InvalidInput
from tests.harness.chaos import ChaosCluster, Isolate, Pause, ProcessExited, ProcessSpec, Resume
from tests.harness.netns import RECORD_DIR, NetnsHosts, list_links, list_netns, resources_of_run, sweep_stale

pytestmark = pytest.mark.root


def _delivered(programs, cluster, src: int, dst: int, via: int, count: int = 5) -> int:
    """Datagrams from src that reach dst's sink. A control burst sent
    afterwards from `via` (a path known to work) bounds the wait: once it has
    arrived, anything from src that was going to arrive has too."""
    tag, control = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    programs.udp_send(cluster, src, dst, tag, count)
    programs.udp_send(cluster, via, dst, control, count)
    deadline = time.monotonic() + 5
    while programs.udp_received(cluster, dst, control) < count:
        assert time.monotonic() < deadline, f"control datagrams host{via} -> host{dst} never arrived"
        time.sleep(0.02)
    time.sleep(0.1)
    return programs.udp_received(cluster, dst, tag)


async def test_every_host_reaches_every_other_over_tcp(echo_cluster, programs):
    hosts = range(len(echo_cluster.hosts))
    failed = [(a, b) for a in hosts for b in hosts if a != b and not programs.tcp_ok(echo_cluster, a, b, timeout=2)]
    assert failed == []
    assert len({h.ip for h in echo_cluster.hosts}) == 3
    # Each host is alone in its namespace: its own address, one non-loopback interface.
    links = (await echo_cluster.run(0, ["ip", "-o", "link", "show"])).stdout.decode()
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == ["eth0", "lo"]
    addr = (await echo_cluster.run(2, ["ip", "-4", "-o", "addr", "show", "eth0"])).stdout.decode()
    assert f" {echo_cluster.hosts[2].ip}/24 " in addr
    # No default route: nothing a host sends can leave the machine.
    assert (await echo_cluster.run(1, ["ip", "-4", "route", "show", "default"])).stdout == b""


async def test_symmetric_partition_blocks_both_ways_and_heal_restores(echo_cluster, programs):
    await echo_cluster.partition([[0], [1, 2]])
    assert not programs.tcp_ok(echo_cluster, 0, 1)
    assert not programs.tcp_ok(echo_cluster, 1, 0)
    assert not programs.tcp_ok(echo_cluster, 2, 0)
    assert programs.tcp_ok(echo_cluster, 1, 2)
    assert _delivered(programs, echo_cluster, 0, 1, via=2) == 0
    # via=0: a host sending to its own address goes over loopback, which faults never touch.
    assert _delivered(programs, echo_cluster, 1, 0, via=0) == 0
    await echo_cluster.heal()
    assert programs.tcp_ok(echo_cluster, 0, 1, timeout=2)
    assert programs.tcp_ok(echo_cluster, 1, 0, timeout=2)
    assert _delivered(programs, echo_cluster, 0, 1, via=2) == 5


async def test_one_way_drops_only_the_named_direction(echo_cluster, programs):
    await echo_cluster.one_way(0, 1)
    assert _delivered(programs, echo_cluster, 0, 1, via=2) == 0
    assert _delivered(programs, echo_cluster, 1, 0, via=2) == 5
    assert _delivered(programs, echo_cluster, 0, 2, via=1) == 5
    assert _delivered(programs, echo_cluster, 2, 1, via=2) == 5
    # TCP needs both directions, so 0 -> 1 fails and so does 1 -> 0 (its SYN-ACK is dropped).
    assert not programs.tcp_ok(echo_cluster, 0, 1)
    assert not programs.tcp_ok(echo_cluster, 1, 0)
    await echo_cluster.heal()
    assert _delivered(programs, echo_cluster, 0, 1, via=2) == 5


async def test_isolated_host_is_cut_from_peers_but_not_from_root_clients(echo_cluster, programs):
    async def current_leader(cluster):  # how a test targets "the leader": a function of the cluster
        assert cluster is echo_cluster
        return 1

    assert await echo_cluster.apply(Isolate(current_leader)) == "isolate host1"
    assert not programs.tcp_ok(echo_cluster, 0, 1)
    assert not programs.tcp_ok(echo_cluster, 1, 2)
    assert programs.tcp_ok(echo_cluster, 0, 2)
    # Clients live in the root namespace (like Jepsen's control node).
    stream = await trio.open_tcp_stream(echo_cluster.hosts[1].ip, programs.port)
    async with stream:
        await stream.send_all(b"hi\n")
        with trio.fail_after(2):
            assert await stream.receive_some(16) == b"hi\n"


async def test_loss_at_p1_drops_everything_and_at_p0_nothing(echo_cluster, programs):
    net = echo_cluster.net
    await echo_cluster.loss(1, 1.0, "in")
    assert not programs.tcp_ok(echo_cluster, 0, 1)
    assert _delivered(programs, echo_cluster, 0, 1, via=1) == 0  # via=1: over loopback, exempt
    (loss_in,) = [c for c in net.rule_counters(1) if c.chain == "CLX-LOSS-IN"]
    assert "--probability 1" in loss_in.rule and loss_in.packets >= 5
    # Outbound from host 1 is untouched: a datagram 1 -> 0 arrives.
    assert _delivered(programs, echo_cluster, 1, 0, via=2) == 5

    await echo_cluster.loss(1, 0.0, "in")
    assert programs.tcp_ok(echo_cluster, 0, 1, timeout=2)
    assert _delivered(programs, echo_cluster, 0, 1, via=2, count=50) == 50
    (loss_in,) = [c for c in net.rule_counters(1) if c.chain == "CLX-LOSS-IN"]
    assert "--probability 0.0" in loss_in.rule and loss_in.packets == 0

    await echo_cluster.loss(1, 1.0, "out")
    assert _delivered(programs, echo_cluster, 1, 0, via=2) == 0
    assert _delivered(programs, echo_cluster, 0, 1, via=2) == 5
    await echo_cluster.heal()
    assert net.rule_counters(1) == []
    with pytest.raises(InvalidInput):
        await echo_cluster.loss(1, 1.5)
    with pytest.raises(InvalidInput):
        await echo_cluster.partition([[0, 1], [1, 2]])
    assert programs.tcp_ok(echo_cluster, 1, 0, timeout=2)


async def test_partial_loss_drops_some_but_not_all(echo_cluster, programs):
    await echo_cluster.loss(2, 0.5, "in")
    got = _delivered(programs, echo_cluster, 0, 2, via=2, count=200)
    # Binomial(200, 0.5): outside [50, 150] has probability < 1e-12.
    assert 50 <= got <= 150


async def test_kill9_then_restart_resumes_service_and_keeps_logs(echo_cluster, programs):
    proc = echo_cluster.process(1)
    pid = proc.pid
    assert await echo_cluster.kill9(1) == -signal.SIGKILL
    assert not proc.running and proc.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not programs.tcp_ok(echo_cluster, 0, 1)
    await echo_cluster.restart(1)
    assert proc.running and proc.pid != pid
    assert programs.tcp_ok(echo_cluster, 0, 1, timeout=2)
    log = proc.log_path.read_text()
    assert log.count("=== start ") == 2 and log.count("serving ") == 2
    assert "serving" in proc.tail(5)


async def test_paused_process_stops_answering_until_resumed(echo_cluster, programs):
    assert await echo_cluster.apply(Pause(2)) == "pause host2"
    assert "paused pid" in echo_cluster.process(2).describe()
    # The kernel still completes the TCP handshake, but the echo never comes back.
    assert not programs.tcp_ok(echo_cluster, 0, 2)
    assert await echo_cluster.apply(Resume()) == "resume ['host2']"
    assert programs.tcp_ok(echo_cluster, 0, 2, timeout=2)
    # A paused process still stops gracefully: SIGTERM is followed by SIGCONT.
    await echo_cluster.pause(2)
    assert await echo_cluster.stop(2, grace_s=5) == -signal.SIGTERM


async def test_graceful_stop_sends_sigterm_first(echo_cluster):
    # The echo server dies on SIGTERM's default action, well within the grace period.
    assert await echo_cluster.stop(0, grace_s=5) == -signal.SIGTERM


async def test_template_values_and_extra_flags(tmp_path):
    spec = ProcessSpec(
        argv=["sh", "-c", 'echo "$0 $@"; sleep 30', "{name}", "{address}", "{join}", "{flags}", "{peers}"]
    )
    async with ChaosCluster(2, tmp_path, spec) as cluster:
        await cluster.start(1, flags="--a\0x\0--b")
        await cluster.start(0, flags="")
        h0, h1 = cluster.hosts

        async def output(host: int) -> list[str]:
            with trio.fail_after(5):
                while True:
                    lines = [
                        line
                        for line in cluster.process(host).log_path.read_text().splitlines()
                        if not line.startswith("===")
                    ]
                    if lines:
                        return lines
                    await trio.sleep(0.02)

        peers = f"{h0.ip}:7400,{h1.ip}:7400"
        assert await output(1) == [f"host1 {h1.ip}:7400 {h0.ip}:7400 --a x --b {peers}"]
        assert await output(0) == [f"host0 {h0.ip}:7400 {h0.ip}:7400 {peers}"]


async def test_process_that_exits_before_ready_fails_the_start_with_its_log(tmp_path):
    async def never(_proc):
        await trio.sleep_forever()

    spec = ProcessSpec(argv=["sh", "-c", "echo boom-from-{name}; exit 3"], ready=never)
    async with ChaosCluster(1, tmp_path, spec) as cluster:
        with pytest.raises(ProcessExited) as info:
            await cluster.start(0)
        assert "boom-from-host0" in str(info.value) and info.value.context["returncode"] == 3


def _gone(run_id: str) -> bool:
    netns, links = resources_of_run(run_id)
    return not netns and not links and not (RECORD_DIR / f"{run_id}.json").exists()


async def test_teardown_leaves_no_namespace_link_or_record(tmp_path):
    async with ChaosCluster(3, tmp_path, ProcessSpec(argv=["sleep", "60"])) as cluster:
        await cluster.start_all()
        run_id = cluster.net.run_id
        netns, links = resources_of_run(run_id)
        assert len(netns) == 3 and len(links) == 4  # three veths and the bridge
        pids = [p.pid for p in cluster.processes]
    assert _gone(run_id)
    assert not [n for n in list_netns() if run_id in n]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_teardown_runs_when_the_body_raises_and_the_error_carries_the_report(tmp_path):
    with pytest.raises(RuntimeError) as info:
        async with ChaosCluster(2, tmp_path, ProcessSpec(argv=["sleep", "60"]), seed=4242) as cluster:
            await cluster.start_all()
            run_id = cluster.net.run_id
            await cluster.isolate(0)
            raise RuntimeError("test body failed")
    assert _gone(run_id)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "seed=4242" in notes and "host0" in notes and "running pid" in notes


def test_teardown_kills_processes_started_with_run_in():
    with NetnsHosts(1) as net:
        proc = net.run_in(0, ["sleep", "60"])
        # A process that left the session is still found through the namespace.
        escaped = int(net.run(0, ["sh", "-c", "setsid sleep 61 >/dev/null 2>&1 & echo $!"]).stdout)
        run_id = net.run_id
    assert proc.returncode == -signal.SIGKILL
    assert _gone(run_id)
    try:
        state = open(f"/proc/{escaped}/status").read()
        assert "State:\tZ" in state, state  # killed, not yet reaped by init
    except FileNotFoundError:
        pass


def test_sweep_removes_what_a_kill9ed_owner_left_and_spares_live_runs():
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from tests.harness.netns import NetnsHosts\n"
                "net = NetnsHosts(2); net.create(); print(net.run_id, flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        orphan = owner.stdout.readline().strip()
        assert len(orphan) == 6, "owner did not create its hosts"
        with NetnsHosts(1) as live:
            assert orphan not in sweep_stale()  # its owner is alive
            os.kill(owner.pid, signal.SIGKILL)
            owner.wait()
            netns, links = resources_of_run(orphan)
            assert len(netns) == 2 and links  # kill -9 ran no cleanup
            assert orphan in sweep_stale()
            assert _gone(orphan)
            assert resources_of_run(live.run_id)[0]  # the live run was spared
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    record = {p.stem for p in RECORD_DIR.glob("*.json")}
    assert orphan not in record and not [link for link in list_links() if orphan in link]


def test_record_is_written_before_any_namespace_exists(monkeypatch):
    # A crash between the record and the first `ip` call must still be sweepable.
    seen = {}
    real_plumb = NetnsHosts._plumb

    def plumb(self):
        seen["record"] = json.loads((RECORD_DIR / f"{self.run_id}.json").read_text())
        seen["netns"] = resources_of_run(self.run_id)[0]
        raise RuntimeError("crash before plumbing")

    monkeypatch.setattr(NetnsHosts, "_plumb", plumb)
    net = NetnsHosts(2)
    with pytest.raises(RuntimeError):
        net.create()
    monkeypatch.setattr(NetnsHosts, "_plumb", real_plumb)
    assert seen["netns"] == [] and seen["record"]["pid"] == os.getpid()
    assert len(seen["record"]["hosts"]) == 2
    assert _gone(net.run_id)
