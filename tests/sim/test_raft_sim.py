"""Seeded whole-cluster simulations of the Raft core (cloudless/testing/raft_sim.py).

Every run checks, after every step, the safety properties of the Raft paper's
Figure 3 (election safety, log matching, leader completeness, state-machine
safety), that no acknowledged write is lost or answered twice, and that the
client history is linearizable. Failures name their seeds; replay one with
`cloudless sim raft --first SEED --seeds 1`.
"""

import pytest

from cloudless.raft import log as raft_log
from cloudless.raft.messages import ConfState, Entry, EntryKind, HardState
from cloudless.raft.ready import Apply, Ready, Send
from cloudless.testing.raft_sim import CRASH_POINTS, SimConfig, SimDisk, SimNetwork, run_seed

CHUNK = 50
DEFAULT_SEEDS = 500


def _nodes(seed):
    return 3 if seed % 2 == 0 else 5


def _run(seeds, **overrides):
    failures = []
    ops = 0
    for seed in seeds:
        result = run_seed(seed, SimConfig(nodes=_nodes(seed), **overrides))
        ops += result.ops_checked
        if not result.ok:
            failures.append(result.describe())
    return failures, ops


@pytest.mark.parametrize("first", range(0, DEFAULT_SEEDS, CHUNK), ids=lambda f: f"seeds{f}-{f + CHUNK - 1}")
def test_figure_3_safety_and_linearizability_hold_under_all_faults(first):
    failures, ops = _run(range(first, first + CHUNK))
    assert not failures, "\n".join(failures)
    assert ops > CHUNK * 20  # the workload really ran


@pytest.mark.slow
@pytest.mark.parametrize("first", range(10_000, 20_000, 500), ids=lambda f: f"seeds{f}")
def test_many_seeds_long_mode(first):
    failures, _ = _run(range(first, first + 500))
    assert not failures, "\n".join(failures)


# A snapshot is installed only a few times per run: crash at most of them.
_RATE = {"after_restore": 0.5}


def _crash_at(point, seeds):
    failures, ops, crashes = [], 0, 0
    for seed in seeds:
        config = SimConfig(nodes=_nodes(seed), crash_point_rate=_RATE.get(point, 0.03), crash_point_names=(point,))
        result = run_seed(seed, config)
        ops += result.ops_checked
        crashes += result.stats.crash_points[point]
        if not result.ok:
            failures.append(result.describe())
    return failures, ops, crashes


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_after_any_step_of_a_ready_loses_nothing_committed(point):
    # Crash often, and only at this point of the steps every driver runs
    # (ready.py): after the leader's early appends, after applying stable
    # entries, after the write (losing it: it was not synced), after the
    # sync, after the acknowledgements went out, after a restore, an apply,
    # a read. No committed entry may be lost, state machines must agree at
    # every index, no node may apply what its disk does not hold, and the
    # history must stay linearizable.
    failures, ops, crashes = _crash_at(point, range(900, 915))
    assert not failures, "\n".join(failures)
    assert crashes > 0, "the simulation never reached this point"
    assert ops > 0


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_after_any_step_of_a_ready_many_seeds_long_mode(point):
    failures, _, crashes = _crash_at(point, range(20_000, 20_400))
    assert not failures, "\n".join(failures)
    assert crashes > 0


def test_an_unknown_crash_point_is_refused():
    with pytest.raises(ValueError, match="unknown crash points"):
        SimConfig(crash_point_names=("after_lunch",))


def _reordered_steps(original, kind):
    # A broken driver: every step of `kind` moved ahead of the write and sync.
    def steps(self, **kwargs):
        out = original(self, **kwargs)
        moved = [s for s in out if isinstance(s, kind)]
        rest = [s for s in out if not isinstance(s, kind)]
        if kind is Send:
            moved = [Send([m for s in moved for m in s.messages], before_sync=True)] if moved else []
        else:
            moved = [Apply([e for s in moved for e in s.entries], before_sync=True)] if moved else []
        return moved + rest

    return steps


def test_the_crash_points_catch_acknowledgements_sent_before_the_sync(monkeypatch):
    # Mutation check (§3.8: an acknowledgement promises durable state): a
    # driver that sends votes and append acknowledgements before its fsync
    # must be caught once nodes crash right after sending.
    monkeypatch.setattr(Ready, "steps", _reordered_steps(Ready.steps, Send))
    failures, _, _ = _crash_at("after_send_before_sync", range(30))
    assert failures
    assert all("seed" in f for f in failures)


def test_the_crash_points_catch_entries_applied_before_the_sync(monkeypatch):
    # Mutation check: applying entries that are not yet on this node's disk
    # lets the state machine run ahead of the log it restarts from.
    monkeypatch.setattr(Ready, "steps", _reordered_steps(Ready.steps, Apply))
    failures, _, _ = _crash_at("after_apply_before_sync", range(10))
    assert failures
    assert any("before it was synced" in f for f in failures)


def test_a_seed_replays_exactly():
    a = run_seed(42)
    b = run_seed(42)
    assert a.stats == b.stats
    assert a.history == b.history
    assert a.stats.crashes > 0 and a.stats.partitions + a.stats.transfers > 0


def test_the_simulator_exercises_every_fault_and_feature():
    total = None
    for seed in range(20):
        stats = run_seed(seed, SimConfig(nodes=_nodes(seed), check_linearizability=False)).stats
        if total is None:
            total = stats
            continue
        for name, value in vars(stats).items():
            setattr(total, name, getattr(total, name) + value)
    for name in (
        "crashes",
        "lost_writes",
        "partitions",
        "transfers",
        "conf_changes",
        "snapshots_installed",
        "snapshots_taken",
        "ops_completed",
        "elections",
    ):
        assert getattr(total, name) > 0, name


def test_the_checks_catch_a_broken_election_restriction(monkeypatch):
    # Mutation check: with §5.4.1 disabled, committed entries get lost and
    # the simulator must notice within a few seeds.
    monkeypatch.setattr(raft_log.RaftLog, "is_up_to_date", lambda self, index, term: True)
    failures, _ = _run(range(30))
    assert failures
    assert any("seed" in f for f in failures)


def test_sim_disk_crash_loses_unsynced_writes_only():
    import random

    disk = SimDisk()
    disk.write(HardState(1, "a", 0), [Entry(1, 1, EntryKind.NORMAL, b"x")])
    disk.sync()
    disk.write(HardState(2, "b", 1), [Entry(2, 2, EntryKind.NORMAL, b"y")])
    assert disk.last_index() == 2  # readable before sync
    lost = disk.crash(random.Random(0), keep=0)
    assert lost == 1
    assert disk.last_index() == 1
    assert disk.initial_state() == (HardState(1, "a", 0), ConfState())


def test_sim_network_partitions_cut_messages_in_flight():
    import random

    from cloudless.raft.messages import Heartbeat

    net = SimNetwork(random.Random(1))
    net.send(Heartbeat("a", "b", 1, 0), now=0)
    net.send(Heartbeat("b", "a", 1, 0), now=0)
    net.block("a", "b")  # asymmetric: a → b only
    delivered = net.due(now=100)
    assert [(m.frm, m.to) for m in delivered] == [("b", "a")]


def test_cli_sim_raft_prints_one_json_document_and_exits_zero():
    import json

    from click.testing import CliRunner

    from cloudless.cli.sim_raft import raft

    result = CliRunner().invoke(raft, ["--seeds", "2", "--first", "5", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["seeds"] == 2 and doc["violations"] == 0 and doc["failed_seeds"] == []
    assert doc["linearizable"] is True and doc["ops_checked"] > 0


def test_cli_sim_raft_fails_and_names_the_seed_when_safety_breaks(monkeypatch):
    import json

    from click.testing import CliRunner

    from cloudless.cli.sim_raft import raft

    monkeypatch.setattr(raft_log.RaftLog, "is_up_to_date", lambda self, index, term: True)
    result = CliRunner().invoke(raft, ["--seeds", "12", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["failed_seeds"] and doc["violations"] > 0
