"""Lifeguard local health awareness (Lifeguard §4.1, memberlist awareness.go).

A member that misses acks and nacks it should have received is more likely
slow itself than surrounded by failures. Its health score rises, and it
stretches its own probe interval and timeouts by (score + 1), so a struggling
member stops accusing healthy ones.
"""

from __future__ import annotations


class Awareness:
    __slots__ = ("enabled", "max_score", "score")

    def __init__(self, max_score: int = 8, enabled: bool = True) -> None:
        self.max_score = max_score
        self.score = 0
        self.enabled = enabled

    def apply_delta(self, delta: int) -> None:
        if not self.enabled:
            return
        self.score = min(self.max_score - 1, max(0, self.score + delta))

    @property
    def multiplier(self) -> int:
        return self.score + 1

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
