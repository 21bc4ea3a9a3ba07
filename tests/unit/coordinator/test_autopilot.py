import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.coordinator.autopilot import Candidate, plan

NOW = 10_000.0


def member(node_id, role="none", state="alive", **kw):
    kw.setdefault("alive_since", 0.0)
    return Candidate(node_id=node_id, state=state, raft_role=role, **kw)


def converge(members, leader="n1", steps=30):
    """Apply plan actions one at a time, as the leader does, until none is left."""
    members = {m.node_id: m for m in members}
    history = []
    for _ in range(steps):
        p = plan(list(members.values()), leader, NOW)
        if not p.actions:
            return members, history
        action = p.actions[0]
        history.append(action)
        m = members[action.node_id]
        role = {"add_learner": "learner", "promote": "voter", "demote": "none", "remove": "none"}.get(action.kind)
        if action.kind == "transfer_leadership":
            leader = action.node_id
            continue
        members[m.node_id] = Candidate(**{**_fields(m), "raft_role": role, "caught_up": role == "learner"})
    raise AssertionError(f"no convergence: {history}")


def _fields(c):
    return {f: getattr(c, f) for f in c.__slots__}


def voters(members):
    return sorted(m.node_id for m in members.values() if m.raft_role == "voter")


def test_voters_grow_one_three_five_as_nodes_join():
    ms = [member("n1", "voter")]
    ms, _ = converge(ms)
    assert voters(ms) == ["n1"]
    ms = [*list(ms.values()), member("n2")]
    ms, _ = converge(ms)
    assert voters(ms) == ["n1"]  # 1 voter for 1-2 suitable nodes
    ms = [*list(ms.values()), member("n3")]
    ms, _ = converge(ms)
    assert voters(ms) == ["n1", "n2", "n3"]
    ms = list(ms.values()) + [member(f"n{i}") for i in range(4, 8)]
    ms, _ = converge(ms)
    assert len(voters(ms)) == 5


def test_new_member_is_not_added_before_it_is_stable():
    ms = [member("n1", "voter"), member("n2", "voter"), member("n3", alive_since=NOW - 1)]
    p = plan(ms, "n1", NOW)
    assert not [a for a in p.actions if a.kind == "add_learner"]


def test_learner_is_promoted_only_when_caught_up():
    ms = [member("n1", "voter"), member("n2", "learner"), member("n3", "learner")]
    assert not [a for a in plan(ms, "n1", NOW).actions if a.kind == "promote"]
    ms[1] = member("n2", "learner", caught_up=True)
    promoted = [a.node_id for a in plan(ms, "n1", NOW).actions if a.kind == "promote"]
    assert promoted == ["n2"]


def test_dead_voter_is_replaced():
    ms = [member("n1", "voter"), member("n2", "voter"), member("n3", "voter", state="dead"), member("n4")]
    final, history = converge(ms)
    assert voters(final) == ["n1", "n2", "n4"]
    assert any(a.kind == "remove" and a.node_id == "n3" for a in history)


def test_battery_node_not_chosen_while_a_mains_node_is_available():
    ms = [
        member("n1", "voter"),
        member("n2", "voter"),
        member("phone", power="battery", battery_pct=90, network="wifi"),
        member("vps"),
    ]
    final, _ = converge(ms)
    assert "phone" not in voters(final)
    assert "vps" in voters(final)


def test_battery_node_becomes_voter_only_when_nothing_better_exists():
    ms = [member("n1", "voter"), member("n2", "voter"), member("phone", power="battery", battery_pct=80)]
    final, _ = converge(ms)
    assert voters(final) == ["n1", "n2", "phone"]


def test_low_battery_voter_is_demoted_with_a_reason():
    ms = [
        member("n1", "voter"),
        member("n2", "voter"),
        member("phone", "voter", power="battery", battery_pct=10),
        member("pc", "voter"),
    ]
    p = plan(ms, "n1", NOW)
    assert p.ineligible["phone"].startswith("on battery at 10%")
    demote = [a for a in p.actions if a.node_id == "phone"]
    assert demote and demote[0].kind == "demote" and "battery" in demote[0].reason


def test_leader_hands_off_before_being_demoted():
    ms = [
        member("n1", "voter", flaps=9),
        member("n2", "voter"),
        member("n3", "voter"),
        member("n4", "voter"),
    ]
    actions = plan(ms, "n1", NOW).actions
    assert actions[0].kind == "transfer_leadership" and actions[0].node_id in {"n2", "n3", "n4"}
    assert not [a for a in actions if a.kind == "demote" and a.node_id == "n1"]


def test_voters_spread_across_zones():
    ms = [
        member("a1", "voter", zone="a"),
        member("a2", zone="a"),
        member("a3", zone="a"),
        member("b1", zone="b"),
        member("c1", zone="c"),
    ]
    final, _ = converge(ms, leader="a1")
    zones = {final[v].zone for v in voters(final)}
    assert zones == {"a", "b", "c"}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(2, 9))
def test_no_single_step_loses_the_quorum_of_healthy_voters(seed, n):
    rng = random.Random(seed)
    ms = {}
    for i in range(n):
        ms[f"n{i}"] = member(
            f"n{i}",
            role=rng.choice(["voter", "voter", "learner", "none"]),
            state=rng.choice(["alive", "alive", "alive", "dead", "suspect"]),
            power=rng.choice(["ac", "battery"]),
            battery_pct=rng.uniform(0, 100),
            caught_up=rng.random() < 0.5,
        )
    ms["n0"] = member("n0", "voter")  # the leader
    for _ in range(20):
        p = plan(list(ms.values()), "n0", NOW)
        if not p.actions:
            break
        a = p.actions[0]
        if a.kind == "transfer_leadership":
            break
        before = [m for m in ms.values() if m.raft_role == "voter"]
        healthy_before = sum(m.state == "alive" for m in before)
        role = {"add_learner": "learner", "promote": "voter", "demote": "none", "remove": "none"}[a.kind]
        ms[a.node_id] = Candidate(**{**_fields(ms[a.node_id]), "raft_role": role})
        after = [m for m in ms.values() if m.raft_role == "voter"]
        healthy_after = sum(m.state == "alive" for m in after)
        assert after, f"seed {seed}: no voter left"
        if healthy_before >= len(before) // 2 + 1:
            assert healthy_after >= len(after) // 2 + 1, f"seed {seed}: {a} lost quorum"


def test_one_crash_in_a_three_node_cluster_does_not_shrink_it_to_one_voter():
    ms = [member("n1", "voter"), member("n2", "voter"), member("n3", "voter", state="dead", down_since=NOW - 5)]
    final, history = converge(ms)
    assert voters(final) == ["n1", "n2"], history
    assert not [a for a in history if a.kind == "demote"]


def test_long_dead_member_no_longer_counts_when_sizing():
    ms = [member("n1", "voter"), member("n2", "voter"), member("n3", "voter", state="dead", down_since=NOW - 3600)]
    final, _ = converge(ms)
    assert voters(final) == ["n1"]


def test_a_suspect_voter_keeps_its_seat():
    ms = [
        member("n1", "voter"),
        member("n2", "voter"),
        member("n3", "voter", state="suspect", down_since=NOW - 1),
        member("n4"),
    ]
    actions = plan(ms, "n1", NOW).actions
    assert not [a for a in actions if a.node_id == "n3"], actions
