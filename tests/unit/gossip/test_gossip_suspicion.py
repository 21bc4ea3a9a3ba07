"""Lifeguard §4.2 suspicion timeout arithmetic and §4.1 awareness arithmetic."""

from __future__ import annotations

import math

import pytest

from cloudless.gossip.awareness import Awareness
from cloudless.gossip.suspicion import Suspicion, suspicion_bounds


def test_timeout_starts_at_max_and_reaches_min_after_k_confirmations():
    s = Suspicion(1, "a", 100.0, min_timeout=2.0, max_timeout=10.0, expected=3)
    assert s.deadline == pytest.approx(110.0)
    steps = []
    for src in ("b", "c", "d"):
        assert s.confirm(src)
        steps.append(s.deadline - 100.0)
    # log(c+1)/log(k+1) interpolation: 10 - 8*0.5 = 6 after one, 10 - 8*log3/log4 after two.
    assert steps[0] == pytest.approx(6.0, abs=0.001)
    assert steps[1] == pytest.approx(10 - 8 * math.log(3) / math.log(4), abs=0.001)
    assert steps[2] == pytest.approx(2.0)
    assert not s.confirm("e")  # beyond k: nothing more to shrink, nothing to re-gossip
    assert not s.confirm("a")  # the original accuser is not a confirmation


def test_no_expected_confirmations_means_min_timeout_at_once():
    s = Suspicion(1, "a", 0.0, min_timeout=2.0, max_timeout=10.0, expected=0)
    assert s.deadline == 2.0


def test_bounds_scale_with_log_cluster_size():
    lo10, hi10 = suspicion_bounds(10, 1.0, 4.0, 6.0, 0.0)
    lo1000, hi1000 = suspicion_bounds(1000, 1.0, 4.0, 6.0, 0.0)
    assert (lo10, hi10) == (4.0, 24.0)
    assert lo1000 == pytest.approx(12.0) and hi1000 == pytest.approx(72.0)
    assert suspicion_bounds(2, 0.1, 1.0, 5.0, 0.5)[0] == 0.5  # floor


def test_awareness_score_bounds_and_scaling():
    a = Awareness(max_score=8)
    a.apply_delta(-3)
    assert a.score == 0
    a.apply_delta(20)
    assert a.score == 7 and a.scale(0.5) == 4.0
    off = Awareness(enabled=False)
    off.apply_delta(5)
    assert off.multiplier == 1
