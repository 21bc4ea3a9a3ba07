"""Selection: the best-scoring feasible node, ties broken by a seeded order.

A node's score is `node part + group part` (see rank.py). `GroupedHeaps`
keeps one max-heap of node parts per spread group, so picking the best node
costs O(groups) and placing a replica re-scores only the chosen node (one
heap push) and the group terms of the spread values it touched. Entries are
invalidated lazily: a heap entry is live only while it matches the node's
current part.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable

GroupKey = tuple[str | None, ...]  # one value per grouping spread attribute
Entry = tuple[int, int, int]  # (-node part, tie-break rank, node index): min-heap order is best first


class TieBreak:
    """A seeded total order on node indexes for breaking equal scores.

    i ↦ (i·a + b) mod 2ᵏ with odd `a` is a bijection on [0, 2ᵏ) ⊇ [0, n), so
    ranks never tie, and drawing (a, b) from the injected generator makes
    the order reproducible from the seed without shuffling every node per
    plan. k is just wide enough for n, which keeps the arithmetic on
    single-digit ints in the hot loop.
    """

    __slots__ = ("a", "b", "mask")

    def __init__(self, rng: random.Random, n: int) -> None:
        k = max(1, n.bit_length())
        self.mask = (1 << k) - 1
        self.a = rng.getrandbits(k) | 1
        self.b = rng.getrandbits(k)

    def __call__(self, i: int) -> int:
        return (i * self.a + self.b) & self.mask


class GroupedHeaps:
    def __init__(
        self,
        entries: dict[GroupKey, list[Entry]],
        group_part: Callable[[GroupKey], int],
        keys_sharing: Callable[[GroupKey], Iterable[GroupKey]],
    ) -> None:
        self.heaps = entries
        for heap in self.heaps.values():
            heapq.heapify(heap)
        # Nodes re-scored since the heaps were built: node -> current negated
        # part, or None once it is no longer a candidate. Untouched nodes'
        # entries are all valid, so the first decision needs no per-node map.
        self.changed: dict[int, int | None] = {}
        self.candidates = sum(len(heap) for heap in entries.values())
        self._group_part = group_part
        self._keys_sharing = keys_sharing
        self._group_cache: dict[GroupKey, int] = {}

    def __len__(self) -> int:
        """Nodes that are candidates now (each scored)."""
        return self.candidates

    def group_part(self, key: GroupKey) -> int:
        cached = self._group_cache.get(key)
        if cached is None:
            cached = self._group_part(key)
            self._group_cache[key] = cached
        return cached

    def best(self) -> tuple[int, GroupKey, int] | None:
        """(node, its group, total score) of the best candidate, or None when there is none."""
        best: tuple[int, int] | None = None
        best_i = -1
        best_key: GroupKey = ()
        changed = self.changed
        empty: list[GroupKey] = []
        for key, heap in self.heaps.items():
            while heap:
                neg, tb, i = heap[0]
                if i not in changed or changed[i] == neg:
                    break
                heapq.heappop(heap)  # stale: the node was re-scored or is no longer a candidate
            if not heap:
                empty.append(key)
                continue
            candidate = (neg - self.group_part(key), tb)
            if best is None or candidate < best:
                best, best_i, best_key = candidate, i, key
        for key in empty:
            del self.heaps[key]
        if best is None:
            return None
        return best_i, best_key, -best[0]

    def rescore(self, key: GroupKey, i: int, tb: int, node_part: int | None) -> None:
        """Node i (a candidate until now) has `node_part`, or None: no longer feasible.
        Its spread values' counts changed, so the terms of groups sharing them are stale."""
        if node_part is None:
            self.changed[i] = None
            self.candidates -= 1
        else:
            self.changed[i] = -node_part
            heapq.heappush(self.heaps.setdefault(key, []), (-node_part, tb, i))
        for other in self._keys_sharing(key):
            self._group_cache.pop(other, None)

    def close(self, keys: Iterable[GroupKey]) -> None:
        """Groups that reached a hard spread limit: none of their nodes is a candidate any more."""
        changed = self.changed
        for key in keys:
            heap = self.heaps.pop(key, None)
            if heap:
                live = {i for neg, _, i in heap if i not in changed or changed[i] == neg}
                for i in live:
                    changed[i] = None
                self.candidates -= len(live)
