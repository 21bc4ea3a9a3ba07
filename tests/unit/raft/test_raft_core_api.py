"""The core's public surface: Ready contents, status, config validation, proposal limits."""

import random

import pytest

from cloudless.errors import InvalidInput
from cloudless.raft.core import ConfChangeRejected, ProposalDropped, RaftConfig, RaftNode, Role, SoftState
from cloudless.raft.messages import ConfChange, EntryKind
from cloudless.raft.storage import MemoryStorage, bootstrap_log
from cloudless.testing.raft_sim import RaftHarness


def single(**kw):
    storage = MemoryStorage()
    bootstrap_log(storage, ["a"])
    node = RaftNode(RaftConfig("a", **kw), storage, random.Random(0))
    return node, storage


def drive(node, storage):
    out = []
    while node.has_ready():
        rd = node.ready()
        storage.write(rd.hard_state, rd.entries, rd.snapshot)
        out.append(rd)
        node.advance(rd)
    return out


def test_a_single_voter_elects_itself_and_commits_alone():
    node, storage = single()
    for _ in range(20):
        node.tick()
    [rd] = drive(node, storage)
    assert rd.soft_state == SoftState("a", Role.LEADER)
    assert rd.must_sync and rd.hard_state.term == 2 and rd.hard_state.vote == "a"
    assert [e.kind for e in rd.committed_entries] == [EntryKind.CONF_CHANGE, EntryKind.NORMAL]
    index = node.propose(b"hello")
    [rd] = drive(node, storage)
    assert [e.data for e in rd.entries] == [b"hello"]
    assert [e.index for e in rd.committed_entries] == [index]
    assert rd.messages == []
    assert node.applied == index and node.commit_index == index
    assert not node.has_ready()


def test_status_reports_role_terms_and_leader_progress():
    h = RaftHarness(["a", "b", "c"])
    h.elect("a")
    status = h["a"].status()
    assert status["role"] == "leader" and status["leader"] == "a" and status["voters"] == ["a", "b", "c"]
    assert set(status["progress"]) == {"a", "b", "c"}
    assert status["progress"]["b"]["state"] == "replicate"
    assert "progress" not in h["b"].status()


def test_config_is_validated():
    with pytest.raises(InvalidInput):
        RaftConfig("")
    with pytest.raises(InvalidInput):
        RaftConfig("a", election_tick=2, heartbeat_tick=2)
    with pytest.raises(InvalidInput):
        RaftConfig("a", max_inflight_msgs=0)


def test_max_uncommitted_bytes_drops_proposals_while_followers_lag():
    h = RaftHarness(["a", "b", "c"], max_uncommitted_bytes=1000)
    h.elect("a")
    h.tick("a")
    h.settle()
    h.isolate("a")
    h["a"].propose(b"x" * 600)
    with pytest.raises(ProposalDropped, match="uncommitted"):
        h["a"].propose(b"y" * 600)


def test_conf_change_of_unknown_type_is_rejected():
    node, storage = single()
    for _ in range(20):
        node.tick()
    drive(node, storage)
    with pytest.raises(ConfChangeRejected):
        node.propose_conf_change(ConfChange(7, "x"))


def test_messages_for_another_node_are_ignored():
    from cloudless.raft.messages import Heartbeat

    node, _ = single()
    node.step(Heartbeat("z", "not-me", 99, 0))
    assert node.term == 1


def test_a_restarted_node_resumes_with_applied_at_its_snapshot():
    h = RaftHarness(["a", "b", "c"])
    h.elect("a")
    for n in range(5):
        h["a"].propose(b"%d" % n)
    h.settle()
    h.tick("a")
    h.settle()
    disk = h.disks["b"]
    index = h["b"].applied
    disk.create_snapshot(index, h["b"].conf_state_at(index), b"state")
    disk.compact(index)
    disk.sync()
    h.crash("b", keep_unsynced=0)
    h.restart("b")
    assert h["b"].applied == index and h["b"].commit_index >= index
    assert h["b"].conf_state.voters == ("a", "b", "c")


def test_uncommitted_budget_is_released_as_entries_commit():
    h = RaftHarness(["a", "b", "c"], max_uncommitted_bytes=1000)
    h.elect("a")
    h.tick("a")
    h.settle()
    for _ in range(5):
        h["a"].propose(b"x" * 600)  # each commits before the next: never over budget
        h.settle()
        h.tick("a")
        h.settle()
    assert h.applied_data("b").count(b"x" * 600) == 5
