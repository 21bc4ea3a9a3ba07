"""The linearizability checker (Wing & Gong 1993; Lowe 2017) on known histories."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudless.testing.linearizability import (
    InvalidHistory,
    Operation,
    RegisterModel,
    VersionedRegisterModel,
    check_history,
)


def op(client, kind, inp, out, call, ret, key="k"):
    return Operation(client, key, kind, inp, out, call, ret)


# --- RegisterModel: put/get/cas ---------------------------------------------------------------


def test_sequential_history_is_linearizable():
    h = [
        op(0, "put", 1, None, 0, 1),
        op(0, "get", None, 1, 2, 3),
        op(0, "cas", (1, 2), True, 4, 5),
        op(0, "get", None, 2, 6, 7),
    ]
    r = check_history(h)
    assert r.linearizable and r.ops_checked == 4 and r.key is None


def test_read_of_absent_key_returns_none():
    assert check_history([op(0, "get", None, None, 0, 1)]).linearizable
    assert not check_history([op(0, "get", None, 7, 0, 1)]).linearizable


def test_stale_read_after_acknowledged_overwrite_is_caught():
    h = [op(0, "put", 1, None, 0, 1), op(0, "put", 2, None, 2, 3), op(1, "get", None, 1, 4, 5)]
    r = check_history(h)
    assert not r.linearizable and r.key == "k"
    assert "get() -> 1" in r.explanation


def test_lost_acknowledged_write_is_caught():
    h = [op(0, "put", 1, None, 0, 1), op(1, "get", None, None, 2, 3)]
    assert not check_history(h).linearizable


def test_read_concurrent_with_write_may_see_either_value():
    for seen in (1, 2):
        h = [op(0, "put", 1, None, 0, 1), op(0, "put", 2, None, 2, 6), op(1, "get", None, seen, 3, 4)]
        assert check_history(h).linearizable, seen


def test_reads_cannot_see_new_then_old_value_during_one_write():
    # Once a read observed the new value, a later read (real-time after it) cannot see the old one.
    h = [
        op(0, "put", 1, None, 0, 1),
        op(0, "put", 2, None, 2, 10),
        op(1, "get", None, 2, 3, 4),
        op(2, "get", None, 1, 5, 6),
    ]
    assert not check_history(h).linearizable


def test_two_concurrent_cas_from_same_value_cannot_both_succeed():
    h = [op(0, "put", 0, None, 0, 1), op(1, "cas", (0, 1), True, 2, 5), op(2, "cas", (0, 2), True, 3, 6)]
    assert not check_history(h).linearizable
    h[2] = op(2, "cas", (0, 2), False, 3, 6)
    assert check_history(h).linearizable


def test_cas_reporting_failure_when_it_must_have_matched_is_caught():
    h = [op(0, "put", 0, None, 0, 1), op(1, "cas", (0, 1), False, 2, 3)]
    assert not check_history(h).linearizable


def test_indeterminate_write_may_take_effect_later():
    h = [op(0, "put", 1, None, 0, 1), op(1, "put", 5, None, 2, None), op(2, "get", None, 5, 10, 11)]
    assert check_history(h).linearizable


def test_indeterminate_write_may_never_take_effect():
    h = [op(0, "put", 1, None, 0, 1), op(1, "put", 5, None, 2, None), op(2, "get", None, 1, 10, 11)]
    assert check_history(h).linearizable


def test_indeterminate_write_cannot_take_effect_before_its_call():
    h = [op(0, "get", None, 5, 0, 1), op(1, "put", 5, None, 2, None)]
    assert not check_history(h).linearizable


def test_indeterminate_write_takes_effect_at_most_once():
    # Seen at t=3, so it took effect; the value cannot revert at t=5 without another write.
    h = [
        op(0, "put", 1, None, 0, 1),
        op(1, "put", 5, None, 2, None),
        op(2, "get", None, 5, 3, 4),
        op(2, "get", None, 1, 5, 6),
    ]
    assert not check_history(h).linearizable


def test_indeterminate_cas_that_did_not_match_cannot_explain_a_value():
    h = [op(0, "put", 1, None, 0, 1), op(1, "cas", (9, 5), None, 2, None), op(2, "get", None, 5, 3, 4)]
    assert not check_history(h).linearizable


def test_keys_are_checked_independently_and_the_failing_key_is_named():
    h = [
        op(0, "put", 1, None, 0, 1, key="a"),
        op(0, "get", None, 1, 2, 3, key="a"),
        op(1, "put", 1, None, 0, 1, key="b"),
        op(1, "get", None, 2, 2, 3, key="b"),
    ]
    r = check_history(h)
    assert not r.linearizable and r.key == "b"
    assert "'b'" in r.explanation


def test_explanation_points_at_shortest_failing_prefix():
    h = [op(0, "put", i, None, 2 * i, 2 * i + 1) for i in range(50)]
    h.append(op(1, "get", None, 3, 101, 102))  # stale: 49 was written last
    h += [op(0, "put", 100 + i, None, 200 + 2 * i, 201 + 2 * i) for i in range(50)]
    r = check_history(h)
    assert not r.linearizable
    assert "t=102" in r.explanation and "get() -> 3" in r.explanation


def test_malformed_histories_are_rejected():
    with pytest.raises(InvalidHistory):
        check_history([op(0, "put", 1, None, 5, 4)])
    with pytest.raises(InvalidHistory):
        check_history([op(0, "frobnicate", 1, None, 0, 1)])
    with pytest.raises(InvalidHistory):
        check_history([op(0, "get", None, 5, 0, 1)], VersionedRegisterModel())


def test_search_that_exceeds_its_budget_reports_timeout_not_a_verdict():
    # 26 mutually concurrent writes and an impossible read: every subset is a
    # distinct configuration, so the search is exponential and must give up.
    h = [op(i, "put", i, None, 0, 100) for i in range(26)] + [op(99, "get", None, -1, 50, 60)]
    h += [op(i, "get", None, i, 50, 60) for i in range(26)]
    r = check_history(h, timeout_s=0.2)
    assert r.timed_out and not r.linearizable


# --- VersionedRegisterModel: the vars store ------------------------------------------------------

V = VersionedRegisterModel()


def test_versioned_sequential_history():
    h = [
        op(0, "put", "a", 5, 0, 1),
        op(0, "get", None, ("a", 5), 2, 3),
        op(0, "cas", (5, "b"), (True, 9), 4, 5),
        op(0, "get", None, ["b", 9], 6, 7),
        op(0, "rm", None, True, 8, 9),
        op(0, "get", None, None, 10, 11),
        op(0, "cas", (0, "c"), (True, 12), 12, 13),
        op(0, "get", None, ("c", 12), 14, 15),
    ]
    assert check_history(h, V).linearizable


def test_versioned_index_must_grow():
    h = [op(0, "put", "a", 5, 0, 1), op(0, "put", "b", 5, 2, 3)]
    assert not check_history(h, V).linearizable
    h = [op(0, "put", "a", 5, 0, 1), op(0, "rm", None, True, 2, 3), op(0, "put", "b", 4, 4, 5)]
    assert not check_history(h, V).linearizable


def test_versioned_cas_on_stale_index_cannot_succeed():
    h = [op(0, "put", "a", 5, 0, 1), op(0, "put", "b", 7, 2, 3), op(1, "cas", (5, "c"), (True, 9), 4, 5)]
    assert not check_history(h, V).linearizable
    h[2] = op(1, "cas", (5, "c"), (False, 7), 4, 5)
    assert check_history(h, V).linearizable
    h[2] = op(1, "cas", (5, "c"), (False, 5), 4, 5)  # failure must report the current index
    assert not check_history(h, V).linearizable


def test_versioned_create_only_cas_fails_on_existing_key():
    h = [op(0, "put", "a", 5, 0, 1), op(1, "cas", (0, "b"), (True, 6), 2, 3)]
    assert not check_history(h, V).linearizable
    h[1] = op(1, "cas", (0, "b"), (False, 5), 2, 3)
    assert check_history(h, V).linearizable


def test_versioned_rm_reports_whether_key_existed():
    assert not check_history([op(0, "rm", None, True, 0, 1)], V).linearizable
    assert check_history([op(0, "rm", None, False, 0, 1)], V).linearizable


def test_versioned_indeterminate_put_is_revealed_by_a_read():
    h = [
        op(0, "put", "a", 5, 0, 1),
        op(1, "put", "b", None, 2, None),
        op(2, "get", None, ("b", 8), 3, 4),
        op(2, "cas", (8, "c"), (True, 10), 5, 6),
    ]
    assert check_history(h, V).linearizable
    # the revealed index must be newer than what the key already had
    h[2] = op(2, "get", None, ("b", 4), 3, 4)
    assert not check_history(h, V).linearizable


def test_versioned_indeterminate_cas_may_or_may_not_apply():
    base = [op(0, "put", "a", 5, 0, 1), op(1, "cas", (5, "b"), None, 2, None)]
    assert check_history([*base, op(2, "get", None, ("b", 6), 3, 4)], V).linearizable
    assert check_history([*base, op(2, "get", None, ("a", 5), 3, 4)], V).linearizable
    assert not check_history([*base, op(2, "get", None, ("c", 6), 3, 4)], V).linearizable


# --- generated histories ---------------------------------------------------------------------------


def run_register(
    rng: random.Random, clients: int, n_ops: int, keys: int, versioned: bool, indeterminate: float = 0.1
) -> list[Operation]:
    """A real sequential execution: each op takes effect at one instant inside its interval."""
    plans = []
    clock = [0.0] * clients
    for _ in range(n_ops):
        c = rng.randrange(clients)
        call = clock[c] + rng.random()
        ret = call + rng.random() * 3
        clock[c] = ret
        lin = rng.uniform(call, ret)
        kind = rng.choice(["put", "get", "cas"] + (["rm"] if versioned else []))
        plans.append((lin, c, f"k{rng.randrange(keys)}", kind, call, ret, rng.randrange(4), rng.random()))
    plans.sort()
    store: dict[str, tuple[int, int]] = {}
    index = 0
    out = []
    for _lin, c, key, kind, call, ret, val, dice in plans:
        lost = dice < indeterminate
        applies = not (lost and dice < indeterminate / 2)  # half the lost ones never take effect
        cur = store.get(key)
        if kind == "get":
            res = None if cur is None else (cur if versioned else cur[0])
        elif kind == "put":
            index += 1
            if applies:
                store[key] = (val, index)
            res = index if versioned else None
        elif kind == "rm":
            res = cur is not None
            if applies:
                store.pop(key, None)
        else:
            if versioned:
                expected = rng.choice([0, cur[1] if cur else 0, rng.randrange(1, index + 2)])
                ok = (cur is None) if expected == 0 else (cur is not None and cur[1] == expected)
                inp = (expected, val)
                if ok:
                    index += 1
                    if applies:
                        store[key] = (val, index)
                res = (ok, index if ok else (cur[1] if cur else 0))
            else:
                expected = rng.choice([None, cur[0] if cur else None, rng.randrange(4)])
                ok = (cur[0] if cur else None) == expected
                inp = (expected, val)
                if ok and applies:
                    store[key] = (val, 0)
                res = ok
        if kind == "put":
            inp = val
        elif kind in ("get", "rm"):
            inp = None
        out.append(Operation(c, key, kind, inp, res, call, None if lost else ret))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), clients=st.integers(1, 6), versioned=st.booleans())
def test_histories_from_real_executions_are_linearizable(seed, clients, versioned):
    h = run_register(random.Random(seed), clients, 120, 3, versioned)
    r = check_history(h, VersionedRegisterModel() if versioned else RegisterModel(), timeout_s=20)
    assert r.linearizable, f"seed={seed}\n{r.explanation}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), clients=st.integers(1, 6), versioned=st.booleans())
def test_a_read_of_a_value_never_written_is_caught(seed, clients, versioned):
    rng = random.Random(seed)
    h = run_register(rng, clients, 120, 3, versioned)
    reads = [i for i, o in enumerate(h) if o.op == "get" and o.ret is not None]
    if not reads:
        return
    i = rng.choice(reads)
    bogus = ("never", 10**9) if versioned else "never"
    h[i] = Operation(h[i].client_id, h[i].key, "get", None, bogus, h[i].call, h[i].ret)
    r = check_history(h, VersionedRegisterModel() if versioned else RegisterModel(), timeout_s=20)
    assert not r.linearizable and r.key == h[i].key, f"seed={seed}"


def test_thousands_of_ops_per_key_check_quickly_at_modest_concurrency():
    h = run_register(random.Random(7), 5, 6000, 1, versioned=True, indeterminate=0.02)
    r = check_history(h, VersionedRegisterModel(), timeout_s=30)
    assert r.linearizable and not r.timed_out


def test_versioned_write_overtaken_by_a_newer_index_is_refuted_quickly():
    # Concurrent puts must take effect in index order; a read that saw the
    # higher index before the lower one was written cannot be followed by
    # a read of the lower one (the never_legal pruning keeps this fast).
    h = [
        op(0, "put", "a", 5, 0, 10),
        op(1, "put", "b", 9, 0, 10),
        op(2, "get", None, ("b", 9), 1, 2),
        op(3, "get", None, ("a", 5), 3, 4),
    ]
    assert not check_history(h, V).linearizable
    h[3] = op(3, "get", None, ("b", 9), 3, 4)
    assert check_history(h, V).linearizable
