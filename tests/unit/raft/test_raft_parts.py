"""The small pieces of the Raft core: quorum arithmetic, progress, sessions, the log view."""

import pytest

from cloudless.raft.log import RaftInvariantError, RaftLog
from cloudless.raft.messages import ConfChange, ConfChangeType, ConfState, Entry
from cloudless.raft.progress import Progress, ProgressState
from cloudless.raft.quorum import VoteResult, apply_conf_change, committed_index, has_quorum, vote_result
from cloudless.raft.sessions import Duplicate, Fresh, SessionTable, Stale
from cloudless.raft.storage import MemoryStorage


def test_committed_index_is_the_majority_match():
    assert committed_index(["a", "b", "c"], {"a": 5, "b": 3, "c": 1}) == 3
    assert committed_index(["a", "b", "c", "d"], {"a": 5, "b": 4, "c": 2, "d": 1}) == 2
    assert committed_index(["a"], {"a": 7}) == 7
    assert committed_index([], {}) == 0


def test_vote_result_counts_only_voters():
    voters = ["a", "b", "c"]
    assert vote_result(voters, {"a": True}) is VoteResult.PENDING
    assert vote_result(voters, {"a": True, "b": True}) is VoteResult.WON
    assert vote_result(voters, {"a": True, "b": False, "c": False}) is VoteResult.LOST
    assert vote_result(voters, {"a": True, "learner": True}) is VoteResult.PENDING
    assert has_quorum(voters, ["a", "c", "x"]) and not has_quorum(voters, ["a", "x"])


def test_conf_changes_move_one_node_at_a_time():
    conf = ConfState(voters=("a", "b", "c"))
    conf = apply_conf_change(conf, ConfChange(ConfChangeType.ADD_LEARNER, "d"))
    assert conf == ConfState(voters=("a", "b", "c"), learners=("d",))
    conf = apply_conf_change(conf, ConfChange(ConfChangeType.ADD_VOTER, "d"))  # promote
    assert conf == ConfState(voters=("a", "b", "c", "d"))
    conf = apply_conf_change(conf, ConfChange(ConfChangeType.ADD_LEARNER, "a"))  # demote
    assert conf == ConfState(voters=("b", "c", "d"), learners=("a",))
    conf = apply_conf_change(conf, ConfChange(ConfChangeType.REMOVE_NODE, "a"))
    assert conf == ConfState(voters=("b", "c", "d"))


def test_progress_probe_replicate_snapshot_transitions():
    pr = Progress(next_index=11, max_inflight=2)
    assert pr.state is ProgressState.PROBE and not pr.is_paused()
    pr.probe_sent = True
    assert pr.is_paused()
    assert pr.maybe_decr_to(10, match_hint=4)  # rejected at prev 10, follower hints 4
    assert pr.next == 5 and not pr.is_paused()
    assert not pr.maybe_decr_to(10, 4)  # stale rejection
    assert pr.maybe_update(6)
    pr.become_replicate()
    assert pr.next == 7
    pr.optimistic_update(9)
    pr.inflights.add(9)
    pr.optimistic_update(12)
    pr.inflights.add(12)
    assert pr.is_paused()  # inflight window full
    pr.inflights.free_le(9)
    assert not pr.is_paused()
    assert not pr.maybe_decr_to(5, 0)  # at or below match: stale
    assert pr.maybe_decr_to(11, 0)
    assert pr.next == 7


def test_session_table_answers_retries_and_ignores_stale_commands():
    table = SessionTable(max_sessions=2)
    assert isinstance(table.check("c1", 1), Fresh)
    table.record("c1", 1, "ok", index=10)
    assert table.check("c1", 1) == Duplicate("ok")
    assert isinstance(table.check("c1", 2), Fresh)
    table.record("c1", 2, True, index=11)
    assert isinstance(table.check("c1", 1), Stale)
    table.record("c2", 1, None, index=12)
    table.record("c3", 1, None, index=13)  # evicts the least recently used (c1, index 11)
    assert len(table) == 2 and isinstance(table.check("c1", 2), Fresh)
    copy = SessionTable.decode(table.encode())
    assert copy.check("c3", 1) == Duplicate(None)


def test_raft_log_refuses_to_truncate_committed_entries():
    storage = MemoryStorage()
    storage.write(None, [Entry(1, i, 0, b"") for i in range(1, 6)])
    log = RaftLog(storage)
    log.commit_to(3)
    with pytest.raises(RaftInvariantError):
        log.append([Entry(2, 3, 0, b"")])
    log.append([Entry(2, 4, 0, b"x")])
    assert log.last_index() == 4 and log.term(4) == 2
    assert [e.index for e in log.entries(2, 5)] == [2, 3, 4]


def test_raft_log_find_conflict_by_term_skips_a_whole_term():
    storage = MemoryStorage()
    storage.write(None, [Entry(t, i, 0, b"") for i, t in enumerate([1, 1, 2, 2, 2, 4, 4], start=1)])
    log = RaftLog(storage)
    assert log.find_conflict_by_term(7, 3) == 5
    assert log.find_conflict_by_term(7, 1) == 2
    assert log.find_conflict_by_term(7, 4) == 7
