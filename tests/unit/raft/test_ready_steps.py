"""`Ready.steps()`: the one order every driver carries a Ready out in (cloudless/raft/ready.py).

The Readies come from real cores in a `RaftHarness`; the crash tests kill a
node right after one step (`process(..., crash_after=...)`), losing every
write it had not synced, and check that nothing committed is lost.
"""

import pytest

from cloudless.raft.core import Role
from cloudless.raft.messages import (
    AppendEntries,
    AppendResponse,
    ConfState,
    HardState,
    Heartbeat,
    RequestVote,
    Snapshot,
    SnapshotMeta,
    VoteResponse,
)
from cloudless.raft.ready import STEP_NAMES, Apply, Ready, Restore, Send, ServeReads, Sync, Write
from cloudless.testing.raft_sim import RaftHarness

ABC = ["a", "b", "c"]


def elected(**kw):
    h = RaftHarness(ABC, **kw)
    h.elect("a")
    assert h["a"].role is Role.LEADER
    return h


def settled(voters, **kw):
    h = RaftHarness(voters, **kw)
    h.settle()  # apply the bootstrap configuration entries
    return h


def names(steps):
    return [s.name for s in steps]


def carry_out(h, node_id, rd):
    """Run `rd`'s steps as RaftHarness.process does, then advance."""
    for step in rd.steps():
        if isinstance(step, Send):
            h.in_flight.extend(step.messages)
        elif isinstance(step, Apply):
            h.applied[node_id].extend(step.entries)
        elif isinstance(step, Write):
            h.disks[node_id].write(step.hard_state, step.entries, step.snapshot)
        elif isinstance(step, Sync):
            h.disks[node_id].sync()
    h[node_id].advance(rd)


def test_10_2_1_a_leaders_appends_leave_before_its_sync():
    h = elected()
    h["a"].propose(b"x")
    rd = h["a"].ready()
    steps = rd.steps()
    assert names(steps) == ["send_before_sync", "write", "sync"]
    assert rd.replicate_before_sync
    early = steps[0].messages
    assert {m.to for m in early} == {"b", "c"}
    assert all(isinstance(m, AppendEntries) and m.entries[-1].data == b"x" for m in early)
    assert [e.data for e in steps[1].entries] == [b"x"]


def test_10_2_1_the_textbook_order_keeps_every_message_behind_the_sync():
    h = elected()
    h["a"].propose(b"x")
    steps = h["a"].ready().steps(replicate_before_sync=False)
    assert names(steps) == ["write", "sync", "send"]


def test_3_8_an_append_is_acknowledged_only_after_the_follower_synced_it():
    h = elected()
    h["a"].propose(b"x")
    h.process("a")
    h.deliver()
    rd = h["b"].ready()
    steps = rd.steps()
    assert not rd.replicate_before_sync
    assert names(steps) == ["write", "sync", "send"]
    assert [type(m) for m in steps[2].messages] == [AppendResponse]


def test_3_8_a_vote_is_granted_only_after_it_is_synced():
    h = settled(ABC, pre_vote=False)
    h["c"].step(RequestVote("a", "c", 7, 10, 1))
    steps = h["c"].ready().steps()
    assert names(steps) == ["write", "sync", "send"]
    assert steps[0].hard_state.vote == "a"
    assert [type(m) for m in steps[2].messages] == [VoteResponse]


def test_3_8_a_candidate_asks_for_votes_only_after_syncing_its_new_term():
    h = settled(ABC, pre_vote=False)
    b = h["b"]
    while b.role is not Role.CANDIDATE:
        b.tick()
    rd = b.ready()
    assert not rd.replicate_before_sync
    assert names(rd.steps()) == ["write", "sync", "send"]
    assert all(isinstance(m, RequestVote) for m in rd.steps()[2].messages)


def test_a_new_leader_of_a_single_voter_cluster_syncs_its_term_before_anything():
    h = settled(["a"])
    a = h["a"]
    while a.role is not Role.LEADER:
        a.tick()
    rd = a.ready()
    # Elected in the same Ready that raised its term: nothing may go first.
    assert not rd.replicate_before_sync
    assert names(rd.steps()) == ["write", "sync", "apply"]


def test_entries_committed_before_this_ready_are_applied_before_its_sync():
    h = elected()
    x = h["a"].propose(b"x")
    h.process("a")
    h.deliver()  # x to b and c
    for n in "bc":
        h.process(n)
    h.deliver()  # their acks: a commits x
    y = h["a"].propose(b"y")
    rd = h["a"].ready()
    steps = rd.steps()
    assert names(steps) == ["send_before_sync", "apply_before_sync", "write", "sync"]
    assert [e.index for e in steps[1].entries] == [x]  # on disk since the last sync
    assert [e.index for e in steps[2].entries] == [y]
    carry_out(h, "a", rd)
    h.deliver()  # y, with commit = x, to b and c
    steps = h["b"].ready().steps()
    assert names(steps) == ["apply_before_sync", "write", "sync", "send"]
    assert [e.index for e in steps[0].entries] == [x]
    assert [e.index for e in steps[1].entries] == [y]


def test_entries_that_commit_in_the_ready_that_appends_them_wait_for_its_sync():
    h = RaftHarness(["a"])
    h.elect("a")
    h["a"].propose(b"x")
    steps = h["a"].ready().steps()
    assert names(steps) == ["write", "sync", "apply"]
    assert [e.data for e in steps[2].entries] == [b"x"]


def test_a_snapshot_is_synced_before_it_is_restored_and_nothing_runs_before_the_sync():
    conf = ConfState(voters=("a", "b", "c"))
    snapshot = Snapshot(SnapshotMeta(10, 2, conf), b"image")
    rd = Ready(
        hard_state=HardState(2, "a", 10),
        snapshot=snapshot,
        messages=[AppendResponse("c", "a", 2, 10), Heartbeat("c", "a", 2, 10)],
        must_sync=True,
        replicate_before_sync=True,  # even if a core said so: a snapshot comes first
    )
    steps = rd.steps()
    assert names(steps) == ["write", "sync", "send", "restore"]
    assert isinstance(steps[3], Restore) and steps[3].snapshot is snapshot


def test_read_states_are_served_last():
    h = elected()
    h.tick("a")
    h.settle()
    h["a"].read_index(b"ctx")
    h.settle()
    assert [rs.ctx for rs in h.read_states["a"]] == [b"ctx"]
    rd = Ready(read_states=h.read_states["a"])
    assert [type(s) for s in rd.steps()] == [ServeReads]


def test_every_step_has_a_crash_point_name():
    h = elected()
    h["a"].propose(b"x")
    seen = set(names(h["a"].ready().steps()))
    assert seen <= set(STEP_NAMES)
    assert len(set(STEP_NAMES)) == len(STEP_NAMES) == 8


# --- crashes between the steps ---------------------------------------------------


def test_10_2_1_a_leader_that_crashes_after_its_early_appends_loses_nothing_committed():
    h = elected()
    h.tick("a")
    h.settle()
    h["a"].propose(b"x")
    h.process("a", crash_after="send_before_sync")
    assert "a" in h.down
    assert h.disks["a"].last_index() < h["a"].log.last_index()  # x was never synced on a
    assert b"x" not in h.applied_data("a")
    h.deliver()  # x reaches b and c all the same
    h.elect("b")
    assert h.leader() == "b"
    h.tick("b")
    h.settle()
    for n in "bc":
        assert b"x" in h.applied_data(n)  # the new leader's no-op committed it
    h.restart("a")
    h.tick("b")
    h.settle()
    h.tick("b")
    h.settle()
    assert h.applied_data("a")[-1:] == [b"x"]
    assert h["a"].commit_index == h["b"].commit_index


def test_3_8_a_follower_that_crashes_after_its_write_never_acknowledged_the_lost_entry():
    h = elected()
    h.tick("a")
    h.settle()
    index = h["a"].propose(b"x")
    h.process("a")
    h.deliver()
    h.process("b", crash_after="write")
    assert h.disks["b"].last_index() < index  # the unsynced write is gone
    assert not any(isinstance(m, AppendResponse) and m.frm == "b" for m in h.in_flight)
    h.settle()  # c alone acknowledges: a and c are a majority
    assert h["a"].commit_index >= index
    assert b"x" in h.applied_data("a") and b"x" in h.applied_data("c")
    h.restart("b")
    h.tick("a")
    h.settle()
    assert h.disks["b"].term(index) == h.disks["a"].term(index)
    assert b"x" in h.applied_data("b")


def test_3_8_a_follower_that_crashes_after_its_sync_keeps_what_it_may_acknowledge():
    h = elected()
    h.tick("a")
    h.settle()
    index = h["a"].propose(b"x")
    h.process("a")
    h.deliver()
    h.process("b", crash_after="sync")
    assert h.disks["b"].last_index() >= index
    assert h.disks["b"].term(index) == h["a"].term
    h.restart("b")
    assert h["b"].log.last_index() >= index


def test_an_unknown_crash_point_is_refused_and_nothing_runs():
    h = elected()
    h["a"].propose(b"x")
    with pytest.raises(ValueError, match="unknown step"):
        h.process("a", crash_after="after_lunch")
    assert h["a"].has_ready() and "a" not in h.down
