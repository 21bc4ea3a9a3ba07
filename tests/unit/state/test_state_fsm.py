import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.state.commands import (
    CasVar,
    ConsumeToken,
    CreateToken,
    Deleted,
    DeleteVar,
    Done,
    InvalidCommand,
    Proposal,
    PutVar,
    RegisterNode,
    Rejected,
    RemoveNode,
    VarResult,
    decode_proposal,
    encode_proposal,
)
from cloudless.state.fsm import CorruptSnapshot, StateMachine


def entry(cmd, now=1000.0, client_id="", seq=0):
    return encode_proposal(Proposal(command=cmd, now=now, client_id=client_id, seq=seq))


def test_put_sets_modify_index_to_the_raft_index():
    fsm = StateMachine()
    assert fsm.apply(5, entry(PutVar("a", "1"))) == VarResult("a", "1", 5)
    assert fsm.apply(6, entry(PutVar("a", "2"))) == VarResult("a", "2", 6)
    var = fsm.get_var("a")
    assert (var.value, var.create_index, var.modify_index) == ("2", 5, 6)


def test_cas_with_index_zero_only_creates():
    fsm = StateMachine()
    assert fsm.apply(1, entry(CasVar("k", "x", 0))) == VarResult("k", "x", 1)
    result = fsm.apply(2, entry(CasVar("k", "y", 0)))
    assert isinstance(result, Rejected) and result.kind == "conflict" and result.current_index == 1
    assert fsm.get_var("k").value == "x"


def test_cas_on_current_index_succeeds_and_stale_index_conflicts():
    fsm = StateMachine()
    fsm.apply(1, entry(PutVar("k", "a")))
    assert fsm.apply(2, entry(CasVar("k", "b", 1))) == VarResult("k", "b", 2)
    stale = fsm.apply(3, entry(CasVar("k", "c", 1)))
    assert isinstance(stale, Rejected) and stale.kind == "conflict"
    assert fsm.get_var("k").value == "b"


def test_delete_missing_key_is_not_found_and_changes_nothing():
    fsm = StateMachine()
    result = fsm.apply(1, entry(DeleteVar("nope")))
    assert isinstance(result, Rejected) and result.kind == "not_found"
    fsm.apply(2, entry(PutVar("k", "v")))
    assert fsm.apply(3, entry(DeleteVar("k"))) == Deleted("k", 3)
    assert fsm.get_var("k") is None


def test_session_retry_applies_once_and_returns_the_first_result():
    """Raft thesis §6.3: a retried command with the same (client, seq) is not re-applied."""
    fsm = StateMachine()
    first = fsm.apply(1, entry(CasVar("k", "v", 0), client_id="c1", seq=1))
    retried = fsm.apply(2, entry(CasVar("k", "v", 0), client_id="c1", seq=1))
    assert first == retried == VarResult("k", "v", 1)
    assert fsm.get_var("k").modify_index == 1


def test_tokens_are_consumed_until_used_up_and_expire_by_proposal_time():
    fsm = StateMachine()
    fsm.apply(1, entry(CreateToken("abcdef", "0" * 64, "node", expires_at=2000.0, max_uses=2), now=1000.0))
    assert isinstance(fsm.apply(2, entry(ConsumeToken("abcdef", "node"))), Done)
    wrong_role = fsm.apply(3, entry(ConsumeToken("abcdef", "admin")))
    assert isinstance(wrong_role, Rejected) and "role" in wrong_role.message
    assert isinstance(fsm.apply(4, entry(ConsumeToken("abcdef", "node"))), Done)
    used_up = fsm.apply(5, entry(ConsumeToken("abcdef", "node")))
    assert isinstance(used_up, Rejected) and "used up" in used_up.message
    fsm.apply(6, entry(CreateToken("ghijkl", "1" * 64, "node", expires_at=2000.0, max_uses=5)))
    expired = fsm.apply(7, entry(ConsumeToken("ghijkl", "node"), now=2000.0))
    assert isinstance(expired, Rejected) and "expired" in expired.message


def test_removing_a_node_revokes_its_live_certificates():
    fsm = StateMachine()
    fsm.apply(1, entry(RegisterNode("n1", "127.0.0.1:7000", "b", certificate_not_after=5000.0)))
    fsm.apply(2, entry(RegisterNode("n1", "127.0.0.1:7000", "c", certificate_not_after=6000.0)))
    fsm.apply(3, entry(RemoveNode("n1")))
    assert fsm.revoked == {"b": 5000.0, "c": 6000.0}
    assert "n1" not in fsm.nodes


def test_invalid_entry_is_rejected_identically_everywhere():
    a, b = StateMachine(), StateMachine()
    garbage = b"\x81\xa1c\xa7var.put"
    assert a.apply(1, garbage) == b.apply(1, garbage)
    assert isinstance(a.apply(2, garbage), Rejected)
    assert a.vars == {}


def test_decode_names_the_bad_field():
    bad = msgspec.msgpack.encode({"command": {"c": "var.put", "key": "bad key!", "value": "v"}, "now": 1.0})
    with pytest.raises(InvalidCommand, match="key"):
        decode_proposal(bad)


def test_snapshot_round_trip_and_corruption_detected():
    fsm = StateMachine()
    fsm.apply(1, entry(PutVar("a", "1"), client_id="c", seq=1))
    fsm.apply(2, entry(RegisterNode("n1", "127.0.0.1:1", "1", certificate_not_after=9e9, labels={"gpu": "yes"})))
    image = fsm.snapshot()
    other = StateMachine()
    other.restore(image)
    assert other.snapshot() == image
    assert other.apply(3, entry(PutVar("a", "1"), client_id="c", seq=1)) == VarResult("a", "1", 1)
    flipped = bytearray(image)
    flipped[-1] ^= 0xFF
    with pytest.raises(CorruptSnapshot):
        StateMachine().restore(bytes(flipped))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["put", "cas", "rm"]), st.sampled_from("abc"), st.integers(0, 30)), max_size=60)
)
def test_replicas_applying_the_same_log_agree_byte_for_byte(ops):
    replicas = [StateMachine(), StateMachine()]
    for i, (op, key, n) in enumerate(ops, start=1):
        cmd = {"put": PutVar(key, str(n)), "cas": CasVar(key, str(n), n), "rm": DeleteVar(key)}[op]
        results = [r.apply(i, entry(cmd)) for r in replicas]
        assert results[0] == results[1]
    assert replicas[0].snapshot() == replicas[1].snapshot()
