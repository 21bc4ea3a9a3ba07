"""The Raft core against the paper (Ongaro & Ousterhout 2014) and the thesis (Ongaro 2014).

Each test drives a hand-stepped cluster (`RaftHarness`) and names the section
whose rule it pins.
"""

import pytest

from cloudless.raft.core import ConfChangeRejected, NotLeader, ProposalDropped, Role
from cloudless.raft.messages import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    EntryKind,
    Heartbeat,
    InstallSnapshot,
    RequestVote,
    TimeoutNow,
    VoteResponse,
)
from cloudless.testing.raft_sim import KVStateMachine, RaftHarness

ABC = ["a", "b", "c"]


def elected(voters=ABC, leader="a", **kw):
    h = RaftHarness(voters, **kw)
    h.elect(leader)
    assert h[leader].role is Role.LEADER
    return h


# --- §5.2 leader election ---------------------------------------------------


def test_5_2_a_timed_out_follower_wins_the_election_and_others_follow():
    h = elected()
    term = h["a"].term
    assert term == 2  # bootstrap entries are term 1
    for n in "bc":
        assert h[n].role is Role.FOLLOWER
        assert h[n].leader == "a"
        assert h[n].term == term


def test_5_2_election_timeout_is_randomized_in_one_to_two_election_ticks():
    h = RaftHarness(ABC, seed=3, pre_vote=False)
    timeouts = set()
    for seed in range(30):
        h = RaftHarness(["a"], seed=seed, pre_vote=False)
        node = h["a"]
        ticks = 0
        while node.role is Role.FOLLOWER and ticks < 40:
            node.tick()
            ticks += 1
        timeouts.add(ticks)
    assert min(timeouts) >= 10 and max(timeouts) < 20
    assert len(timeouts) > 3


def test_5_2_a_node_grants_at_most_one_vote_per_term():
    h = RaftHarness(ABC, pre_vote=False)
    c = h["c"]
    c.step(RequestVote("a", "c", 5, 10, 1))
    c.step(RequestVote("b", "c", 5, 10, 1))
    h.process("c")
    answers = [m for m in h.in_flight if isinstance(m, VoteResponse)]
    assert [(m.to, m.granted) for m in answers] == [("a", True), ("b", False)]
    assert h.disks["c"].durable.initial_state()[0].vote == "a"  # persisted before the answer left


def test_5_2_a_candidate_that_hears_from_the_leader_of_its_term_steps_down():
    h = RaftHarness(ABC, pre_vote=False)
    h.tick("b", 30)  # b campaigns in term 2
    assert h["b"].role is Role.CANDIDATE
    h["b"].step(AppendEntries("a", "b", h["b"].term, 1, 1, (), 1))
    assert h["b"].role is Role.FOLLOWER and h["b"].leader == "a"


def test_5_1_a_stale_leader_learns_the_new_term_from_any_reply_and_steps_down():
    h = elected()
    h.isolate("a")
    h.elect("b")
    assert h["b"].role is Role.LEADER
    h.heal()
    h.tick("a", 1)  # heartbeat from the stale leader reaches b and c
    h.settle()
    assert h["a"].role is Role.FOLLOWER
    assert h["a"].term == h["b"].term


# --- §5.3 log replication -----------------------------------------------------


def test_5_3_committed_entries_are_applied_in_order_everywhere():
    h = elected()
    for n in range(5):
        h["a"].propose(b"v%d" % n)
    h.settle()
    h.tick("a")
    h.settle()
    for n in ABC:
        assert h.applied_data(n) == [b"v0", b"v1", b"v2", b"v3", b"v4"]


def test_5_3_a_follower_with_a_conflicting_suffix_is_overwritten_by_the_leader():
    h = elected()
    h.isolate("a")
    for n in range(3):
        h["a"].propose(b"lost%d" % n)  # never replicated: a is cut off
    h.settle()
    h.elect("b")
    h["b"].propose(b"kept")
    h.settle()
    h.heal()
    h.tick_all(3)
    for n in ABC:
        assert b"kept" in h.applied_data(n)
        assert not any(d.startswith(b"lost") for d in h.applied_data(n))
    assert h.disks["a"].entries(1, h.disks["a"].last_index() + 1) == h.disks["b"].entries(
        1, h.disks["b"].last_index() + 1
    )


def test_5_3_fast_backoff_finds_the_match_point_in_few_round_trips():
    # A follower with a 40-entry divergent tail from an old term: the
    # reject hint lets the leader skip the whole term at once instead of
    # backing off one entry per round trip (thesis §5.3).
    h = elected()
    h.isolate("a")
    for n in range(40):
        h["a"].propose(b"x%d" % n)  # divergent tail, on a only
    h.settle()
    h.elect("b")
    for n in range(40):
        h["b"].propose(b"y%d" % n)
    h.settle()
    h["b"].transfer_leadership("c")  # c leads with a leader's view of a: next = its last + 1
    h.settle()
    assert h["c"].role is Role.LEADER
    seen = len(h.delivered)
    h.heal()
    h.tick_all(3)
    rejects = [m for m in h.delivered[seen:] if isinstance(m, AppendResponse) and m.reject and m.frm == "a"]
    assert 1 <= len(rejects) <= 2
    last = h.disks["c"].last_index()
    assert h.disks["a"].last_index() == last
    assert h.disks["a"].entries(1, last + 1) == h.disks["c"].entries(1, last + 1)


def test_5_3_pipelined_appends_respect_the_inflight_limit():
    h = elected(max_inflight_msgs=2, max_size_per_msg=30)
    h.settle()
    h.in_flight.clear()
    for n in range(10):
        h["a"].propose(b"p%d" % n)
    h.process("a")
    appends_to_b = [m for m in h.in_flight if isinstance(m, AppendEntries) and m.to == "b" and m.entries]
    assert len(appends_to_b) == 2  # then the pipe is full until acks come back
    h.settle()
    h.tick("a")
    h.settle()
    assert len(h.applied_data("b")) == 10


# --- §5.4 safety ------------------------------------------------------------


def test_5_4_1_election_restriction_a_stale_log_cannot_win():
    h = elected()
    h.isolate("c")
    h["a"].propose(b"committed")
    h.settle()
    assert h["a"].commit_index == h["b"].commit_index
    h.heal()
    h.isolate("a")
    h.expire_leases()
    # c's log lacks the committed entry: b must refuse it.
    h["b"].step(RequestVote("c", "b", h["b"].term + 1, 4, 2))
    h.process("b")
    vote = [m for m in h.in_flight if isinstance(m, VoteResponse) and m.frm == "b"][-1]
    assert not vote.granted


def test_5_4_2_figure_8_a_leader_never_commits_an_old_term_entry_by_counting():
    # s1 leads term 2 and gets entry (2, idx 3) onto s2 only, then loses
    # leadership. Re-elected in a later term, it replicates idx 3 to s3: a
    # majority holds it, but it is from an older term, so it must not commit
    # until an entry of the current term does (Figure 8 (c)).
    five = ["s1", "s2", "s3", "s4", "s5"]
    h = elected(five, "s1", max_size_per_msg=1)
    h.tick("s1")
    h.settle()
    base = h["s1"].commit_index
    for n in ("s3", "s4", "s5"):
        h.isolate(n)
    h["s1"].propose(b"old")
    h.settle()
    old_index = base + 1
    assert h.disks["s2"].term(old_index) == 2
    h.heal()
    # s1 crashes and restarts; s5 never won; s1 wins again in a later term,
    # with s2 and s3 voting (s4/s5 cut off so they cannot take over).
    h.crash("s1")
    h.restart("s1")
    h.isolate("s4")
    h.isolate("s5")
    h.expire_leases()
    node = h["s1"]
    while node.role is Role.FOLLOWER:
        node.tick()
    # Votes flow, but replication to s3 is held back at first.
    h.settle(drop=lambda m: m.to == "s3" and isinstance(m, (AppendEntries, Heartbeat)))
    assert h["s1"].role is Role.LEADER and h["s1"].term > 2
    noop_index = old_index + 1
    # Now let exactly one message through to s3: the old-term entry alone.
    # s3 rejects the probe at old_index (it lacks that entry), hinting at old_index - 1.
    h["s1"].step(
        AppendResponse("s3", "s1", h["s1"].term, old_index, reject=True, hint_index=old_index - 1, hint_term=2)
    )
    h.process("s1")
    to_s3 = [m for m in h.in_flight if isinstance(m, AppendEntries) and m.to == "s3" and m.entries]
    assert to_s3 and to_s3[0].entries[0].index == old_index and len(to_s3[0].entries) == 1
    h.in_flight = [m for m in h.in_flight if m.to == "s3"]
    h.deliver()
    h.process("s3")
    h.in_flight = [m for m in h.in_flight if m.to == "s1" and m.frm == "s3"]
    h.deliver()
    # s1, s2 and s3 hold idx old_index: a majority of five, but of term 2.
    assert h["s1"].commit_index < old_index
    h.settle()
    h.tick("s1")
    h.settle()
    assert h["s1"].commit_index >= noop_index  # commits once its own entry is on a majority


def test_5_4_3_leader_completeness_committed_entries_survive_leader_changes():
    h = elected()
    h["a"].propose(b"durable")
    h.settle()
    h.tick("a")
    h.settle()
    h.crash("a")
    h.elect("b")
    assert h["b"].role is Role.LEADER
    h["b"].propose(b"next")
    h.settle()
    h.tick("b")
    h.settle()
    assert h.applied_data("c") == [b"durable", b"next"]


# --- §6 membership changes ----------------------------------------------------


def test_6_add_learner_then_promote_to_voter():
    h = RaftHarness(ABC, extra=["d"])
    h.elect("a")
    h.tick("a")
    h.settle()
    h["a"].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))
    h.settle()
    h.tick("a")
    h.settle()
    assert h["d"].role is Role.LEARNER
    assert h["a"].conf_state.learners == ("d",)
    h["a"].propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, "d"))
    h.settle()
    h.tick("a")
    h.settle()
    assert h["d"].conf_state.voters == ("a", "b", "c", "d")
    assert h["d"].role is Role.FOLLOWER
    assert h["d"].commit_index == h["a"].commit_index


def test_6_only_one_uncommitted_conf_change_at_a_time():
    h = elected()
    h.tick("a")
    h.settle()
    h.isolate("b")
    h.isolate("c")
    h["a"].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "z"))
    h.settle()
    assert h["a"].conf_state.learners == ("z",)  # in force from the moment it is appended
    with pytest.raises(ProposalDropped, match="still uncommitted"):
        h["a"].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "y"))
    h.heal()
    h.tick("a")
    h.settle()
    h["a"].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "y"))


def test_6_a_new_leader_cannot_change_membership_before_its_noop_commits():
    h = RaftHarness(ABC)
    h.elect("a")
    # Elected, but its no-op only reached b... hold every append back.
    h2 = RaftHarness(ABC, pre_vote=False)
    node = h2["a"]
    for _ in range(40):
        node.tick()
        if node.role is Role.CANDIDATE:
            break
    h2.process("a")
    h2.in_flight = [m for m in h2.in_flight if isinstance(m, RequestVote)]
    h2.deliver()
    for n in "bc":
        h2.process(n)
    h2.deliver()  # votes come back: a becomes leader and appends its no-op
    assert node.role is Role.LEADER
    with pytest.raises(ProposalDropped, match="committed an entry of its term"):
        node.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))


def test_6_removing_the_last_voter_is_rejected():
    h = RaftHarness(["a"])
    h.elect("a")
    with pytest.raises(ConfChangeRejected):
        h["a"].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, "a"))


def test_6_a_removed_leader_steps_down_once_the_change_commits():
    h = elected()
    h.tick("a")
    h.settle()
    h["a"].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, "a"))
    h.settle()
    assert h["a"].role is not Role.LEADER
    assert h["b"].conf_state.voters == ("b", "c")
    h.elect("b")
    assert h["b"].role is Role.LEADER
    h["b"].propose(b"after")
    h.settle()
    h.tick("b")
    h.settle()
    assert b"after" in h.applied_data("c")
    # a is no longer a voter: it never campaigns again.
    h.tick("a", 50)
    assert h["a"].role is Role.FOLLOWER


def test_6_membership_change_under_partition_commits_only_with_the_new_majority():
    # Adding d to {a,b,c} with c cut off: the change commits on {a,b} (2 of 3)
    # and from then on entries need 3 of 4 voters, so {a,b} alone no longer
    # commit while d is down too.
    h = RaftHarness(ABC, extra=["d"])
    h.elect("a")
    h.tick("a")
    h.settle()
    h.isolate("c")
    h["a"].propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, "d"))
    h.settle()
    assert h["a"].conf_state.voters == ("a", "b", "c", "d")
    committed = h["a"].commit_index
    h.isolate("d")
    h["a"].propose(b"needs-three")
    h.settle()
    assert h["a"].commit_index == committed
    h.heal()
    h.tick("a")
    h.settle()
    h.tick("a")
    h.settle()
    assert h["a"].commit_index > committed
    assert b"needs-three" in h.applied_data("d")


def test_6_learners_never_vote_and_never_campaign():
    h = RaftHarness(ABC, extra=["d"])
    h.elect("a")
    h.tick("a")
    h.settle()
    h["a"].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))
    h.settle()
    h.tick("a")
    h.settle()
    assert h["d"].role is Role.LEARNER
    h.isolate("a")
    h.tick("d", 100)
    assert h["d"].role is Role.LEARNER  # never became a (pre-)candidate
    # A candidate does not count a learner's grant: b + d is not a majority of {a,b,c}.
    h.isolate("c")
    h.blocked.discard(("b", "d"))
    h.blocked.discard(("d", "b"))
    b = h["b"]
    for _ in range(60):
        b.tick()
    h.settle()
    b.step(VoteResponse("d", "b", b.term + 1, True, pre_vote=True))
    assert b.role is not Role.LEADER


# --- §7 log compaction ------------------------------------------------------


def _compact(h, node_id):
    disk = h.disks[node_id]
    node = h[node_id]
    index = node.applied
    disk.create_snapshot(index, node.conf_state_at(index), b"state@%d" % index)
    disk.compact(index)
    disk.sync()


def test_7_a_follower_behind_the_compaction_point_gets_a_chunked_snapshot():
    h = elected(snapshot_chunk_bytes=2)
    h.tick("a")
    h.settle()
    h.isolate("c")
    for n in range(10):
        h["a"].propose(b"e%d" % n)
    h.settle()
    h.tick("a")
    h.settle()
    _compact(h, "a")
    h.heal()
    h.tick("a")
    h.settle()
    h.tick("a")
    h.settle()
    chunks = [m for m in h.delivered if isinstance(m, InstallSnapshot) and m.to == "c"]
    assert len({m.offset for m in chunks}) >= 3  # b"state@NN" in 2-byte chunks
    assert h.snapshots_installed["c"][-1].data == h.disks["a"].snapshot().data
    assert h["c"].commit_index == h["a"].commit_index
    assert h.disks["c"].first_index() == h.disks["a"].snapshot().meta.index + 1


def test_7_snapshot_install_while_the_leader_keeps_appending():
    h = elected(snapshot_chunk_bytes=2)
    h.tick("a")
    h.settle()
    h.isolate("c")
    for n in range(6):
        h["a"].propose(b"e%d" % n)
    h.settle()
    h.tick("a")
    h.settle()
    _compact(h, "a")
    h.heal()
    h.tick("a")
    # Interleave new proposals with the snapshot transfer.
    for n in range(8):
        h["a"].propose(b"f%d" % n)
        h.process("a")
        h.deliver()
        for node in ABC:
            h.process(node)
        h.deliver()
    h.settle()
    for _ in range(3):
        h.tick("a")
        h.settle()
    assert h.snapshots_installed["c"]
    assert h["c"].commit_index == h["a"].commit_index
    assert h.applied_data("c")[-8:] == [b"f%d" % n for n in range(8)]


def test_7_a_lost_snapshot_chunk_is_resent():
    h = elected(snapshot_chunk_bytes=3)
    h.tick("a")
    h.settle()
    h.isolate("c")
    for n in range(4):
        h["a"].propose(b"e%d" % n)
    h.settle()
    h.tick("a")
    h.settle()
    _compact(h, "a")
    h.heal()
    h.tick("a")
    dropped = []

    def drop_second_chunk(m):
        if isinstance(m, InstallSnapshot) and m.offset == 3 and not dropped:
            dropped.append(m)
            return True
        return False

    h.settle(drop=drop_second_chunk)
    for _ in range(4):
        h.tick("a")
        h.settle()
    assert dropped
    assert h.snapshots_installed["c"]
    assert h["c"].commit_index == h["a"].commit_index


# --- §8 client interaction: ReadIndex (thesis §6.4) --------------------------


def test_8_read_index_is_released_only_after_a_heartbeat_quorum():
    h = elected()
    h.tick("a")
    h.settle()
    h.in_flight.clear()
    h["a"].read_index(b"r1")
    h.process("a")
    assert h.read_states["a"] == []
    assert any(isinstance(m, Heartbeat) and m.ctx for m in h.in_flight)
    h.settle()
    assert [(rs.ctx, rs.index) for rs in h.read_states["a"]] == [(b"r1", h["a"].commit_index)]


def test_8_a_partitioned_leader_serves_no_reads():
    h = elected()
    h.tick("a")
    h.settle()
    h.isolate("a")
    h["a"].read_index(b"stale?")
    h.settle()
    h.tick("a", 3)
    h.settle()
    assert h.read_states["a"] == []


def test_8_a_new_leader_answers_reads_only_after_committing_in_its_term():
    h = RaftHarness(ABC, pre_vote=False)
    node = h["a"]
    for _ in range(40):
        node.tick()
        if node.role is Role.CANDIDATE:
            break
    h.process("a")
    h.deliver()
    for n in "bc":
        h.process(n)
    h.deliver()
    assert node.role is Role.LEADER
    node.read_index(b"early")
    h.process("a")
    assert h.read_states["a"] == []
    h.settle()
    h.tick("a")
    h.settle()
    [rs] = h.read_states["a"]
    assert rs.ctx == b"early" and h["a"].log.term(rs.index) == h["a"].term


def test_8_a_follower_read_is_forwarded_and_answered_by_the_leader():
    h = elected()
    h.tick("a")
    h.settle()
    h["b"].read_index(b"via-b")
    h.settle()
    [rs] = h.read_states["b"]
    assert rs.ctx == b"via-b" and rs.index == h["a"].commit_index


def test_8_read_index_without_a_known_leader_raises_not_leader():
    h = RaftHarness(ABC)
    with pytest.raises(NotLeader):
        h["b"].read_index(b"x")


def test_8_proposals_on_a_follower_raise_not_leader_with_a_hint():
    h = elected()
    with pytest.raises(NotLeader) as info:
        h["b"].propose(b"x")
    assert info.value.leader == "a"
    assert info.value.exit_code == 5


def test_8_a_retried_command_applies_exactly_once():
    import msgspec

    from cloudless.testing.raft_sim import KVCommand

    h = elected()
    cmd = msgspec.msgpack.encode(KVCommand("c1", 1, "cas", "k", "v1", None))
    h["a"].propose(cmd)
    h["a"].propose(cmd)  # the client's retry after a timeout
    retry = msgspec.msgpack.encode(KVCommand("c1", 2, "cas", "k", "v2", "v1"))
    h["a"].propose(retry)
    h["a"].propose(retry)
    h.settle()
    h.tick("a")
    h.settle()
    fsm = KVStateMachine()
    results = [fsm.apply(e) for e in h.applied["b"] if e.kind == EntryKind.NORMAL and e.data]
    assert [r[2] for r in results] == [True, True, True, True]  # duplicates get the recorded answer
    assert fsm.kv == {"k": "v2"}
    assert fsm.applied_commands == 2


# --- thesis §9.6 pre-vote and §4.2.3 check-quorum / leader lease -------------


def test_thesis_9_6_a_partitioned_node_does_not_inflate_its_term_with_pre_vote():
    h = elected()
    term = h["a"].term
    h.isolate("c")
    h.tick("c", 200)
    h.settle()
    assert h["c"].term == term  # it kept pre-voting, never campaigning
    h.heal()
    h.tick_all(3)
    assert h["a"].role is Role.LEADER and h["a"].term == term


def test_thesis_9_6_without_pre_vote_a_returning_node_disrupts_the_leader():
    h = elected(pre_vote=False, check_quorum=False)
    term = h["a"].term
    h.isolate("c")
    h.tick("c", 200)
    h.settle()
    assert h["c"].term > term
    h.heal()
    h.tick_all(3)
    assert h["a"].term > term  # the contrast that motivates pre-vote


def test_thesis_4_2_3_followers_ignore_vote_requests_while_their_leader_is_live():
    h = elected(pre_vote=False)
    b = h["b"]
    b.step(RequestVote("c", "b", b.term + 5, 100, b.term))
    h.process("b")
    assert b.term == h["a"].term and b.leader == "a"
    assert not [m for m in h.in_flight if isinstance(m, VoteResponse) and m.frm == "b"]


def test_thesis_6_2_check_quorum_an_isolated_leader_steps_down():
    h = elected()
    h.isolate("a")
    h.tick("a", 2 * h["a"].config.election_tick + 1)
    h.settle()
    assert h["a"].role is Role.FOLLOWER
    assert h["a"].leader is None


# --- thesis §3.10 leadership transfer -----------------------------------------


def test_thesis_3_10_transfer_to_an_up_to_date_follower():
    h = elected()
    h.tick("a")
    h.settle()
    term = h["a"].term
    h["a"].transfer_leadership("c")
    h.settle()
    assert h["c"].role is Role.LEADER
    assert h["c"].term == term + 1
    assert any(isinstance(m, TimeoutNow) for m in h.delivered)


def test_thesis_3_10_transfer_to_a_lagging_follower_catches_it_up_first():
    h = elected()
    h.tick("a")
    h.settle()
    h.isolate("c")
    for n in range(5):
        h["a"].propose(b"v%d" % n)
    h.settle()
    h.heal()
    h["a"].transfer_leadership("c")
    with pytest.raises(ProposalDropped):
        h["a"].propose(b"during transfer")
    h.settle()
    assert h["c"].role is Role.LEADER
    assert h["c"].log.last_index() >= h["b"].log.last_index()


def test_thesis_3_10_a_transfer_that_cannot_finish_is_abandoned():
    h = elected()
    h.tick("a")
    h.settle()
    h.isolate("c")
    h["a"].transfer_leadership("c")
    h.tick("a", h["a"].config.election_tick)  # b stays in contact: no step down
    h.settle()
    assert h["a"].role is Role.LEADER
    h["a"].propose(b"accepted again")


# --- persistence: crash at each point of the driver loop ----------------------


def test_votes_and_entries_are_durable_before_any_message_leaves():
    h = RaftHarness(ABC, pre_vote=False)
    c = h["c"]
    c.step(RequestVote("a", "c", 7, 10, 1))
    rd = c.ready()
    assert rd.must_sync and rd.hard_state.vote == "a"
    assert any(isinstance(m, VoteResponse) and m.granted for m in rd.messages)
    # The driver contract: a crash between write and sync loses the vote,
    # but then the grant was never sent either.
    h.disks["c"].write(rd.hard_state, rd.entries)
    h.crash("c", keep_unsynced=0)
    h.restart("c")
    assert h["c"].vote == "" and h["c"].term == 1
    h["c"].step(RequestVote("b", "c", 7, 10, 1))
    h.process("c")
    granted = [m for m in h.in_flight if isinstance(m, VoteResponse) and m.granted]
    assert [m.to for m in granted] == ["b"]  # one grant in term 7, ever sent


def test_a_restarted_node_recovers_term_vote_log_and_configuration():
    h = RaftHarness(ABC, extra=["d"])
    h.elect("a")
    h.tick("a")
    h.settle()
    h["a"].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))
    h["a"].propose(b"x")
    h.settle()
    before = h["b"].status()
    h.crash("b")
    h.restart("b")
    after = h["b"].status()
    for key in ("term", "vote", "last_index", "voters", "learners"):
        assert after[key] == before[key]


# --- partitions and absences --------------------------------------------------


def test_5_2_a_minority_partition_neither_stops_the_majority_nor_disrupts_it():
    h = elected(["a", "b", "c", "d", "e"], "a")
    term = h["a"].term
    h.isolate("d")
    h.isolate("e")
    for n in range(3):
        h["a"].propose(b"m%d" % n)
    h.tick_all(30)  # d and e time out again and again on their side
    assert h.applied_data("b")[-3:] == [b"m0", b"m1", b"m2"]
    assert h.applied_data("d") == []
    h.heal()
    h.tick_all(5)
    assert h["a"].role is Role.LEADER and h["a"].term == term
    assert h.applied_data("d")[-3:] == [b"m0", b"m1", b"m2"]


def test_5_2_a_partitioned_leader_is_replaced_and_its_writes_never_commit():
    h = elected(["a", "b", "c", "d", "e"], "a")
    h.isolate("a")
    before = h["a"].term
    h["a"].propose(b"doomed")
    h.tick_all(40)  # check-quorum makes a step down; the others elect
    assert h["a"].term == before
    leader = h.leader()
    assert leader not in (None, "a")
    assert h["a"].role is not Role.LEADER  # stepped down (check-quorum)...
    assert h[leader].term > before  # ...while its own term stayed put (pre-vote)
    h[leader].propose(b"winner")
    h.tick_all(2)
    h.heal()
    h.tick_all(5)
    for n in "abcde":
        assert b"doomed" not in h.applied_data(n)
        assert b"winner" in h.applied_data(n)


def test_7_a_node_that_returns_after_a_long_absence_catches_up_without_disruption():
    h = elected(snapshot_chunk_bytes=16)
    h.tick("a")
    h.settle()
    h.crash("c")
    for round_ in range(5):
        for n in range(10):
            h["a"].propose(b"r%dn%d" % (round_, n))
        h.tick_all(2)
        _compact(h, "a")
        _compact(h, "b")
    term = h["a"].term
    h.tick_all(50)  # long absence: many election timeouts pass
    h.restart("c")
    h.tick_all(10)
    assert h["a"].role is Role.LEADER and h["a"].term == term
    assert h["c"].commit_index == h["a"].commit_index
    assert h.snapshots_installed["c"]
