"""Lifeguard suspicion timeouts (Lifeguard §4.2, memberlist suspicion.go).

A suspicion starts with the longest timeout and shrinks logarithmically as
independent members confirm it, down to the minimum once `expected`
confirmations arrived. It is a deadline calculation: the core asks for the
deadline after each confirmation and acts when `now` passes it.
"""

from __future__ import annotations

import math


def suspicion_bounds(
    n: int, probe_interval: float, suspicion_mult: float, max_mult: float, floor: float
) -> tuple[float, float]:
    """(min, max) timeout for a cluster of n members, memberlist's scaling:
    min = mult * log10(n) * probe interval, never below `floor`."""
    node_scale = max(1.0, math.log10(max(1, n)))
    low = max(floor, suspicion_mult * node_scale * probe_interval)
    return low, low * max_mult


class Suspicion:
    __slots__ = (
        "confirmers",
        "deadline",
        "expected",
        "incarnation",
        "max_timeout",
        "min_timeout",
        "not_before",
        "start",
    )

    def __init__(
        self,
        incarnation: int,
        source: str,
        start: float,
        min_timeout: float,
        max_timeout: float,
        expected: int,
    ) -> None:
        self.incarnation = incarnation
        self.start = start
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        # Confirmations cannot come from the suspect or from the first accuser.
        self.expected = max(0, expected)
        self.confirmers = {source}
        self.not_before = start
        self.deadline = start + self.timeout()

    @property
    def confirmations(self) -> int:
        return len(self.confirmers) - 1

    def timeout(self) -> float:
        if self.expected == 0:
            return self.min_timeout
        c = min(self.confirmations, self.expected)
        frac = math.log(c + 1) / math.log(self.expected + 1)
        raw = self.max_timeout - frac * (self.max_timeout - self.min_timeout)
        # memberlist floors to whole milliseconds; keep it comparable.
        return max(self.min_timeout, math.floor(raw * 1000.0) / 1000.0)

    def confirm(self, source: str) -> bool:
        """Count an independent accusation; True if it was new (worth re-gossiping)."""
        if self.confirmations >= self.expected or source in self.confirmers:
            return False
        self.confirmers.add(source)
        self.deadline = max(self.not_before, self.start + self.timeout())
        return True

    def postpone(self, not_before: float) -> None:
        """Hold the verdict until `not_before` (our own clock was not trustworthy)."""
        self.not_before = max(self.not_before, not_before)
        self.deadline = max(self.deadline, not_before)
