"""Where chunks live: weighted rendezvous (HRW) hashing over storage members.

Pure: members and policy in, an ordered list of node ids out.

Each eligible member scores a chunk `-w / ln(h)` with `h` a hash of
(digest, member) mapped uniformly into (0, 1) and `w` its capacity: the
member with the highest score wins with probability proportional to its
weight (Schindelhauer & Schomaker, "Weighted distributed hash tables", 2005;
the logarithmic method). A join or leave therefore moves only the chunks whose
top-R changes, about R/n of them. Replicas are spread over zones first: the
ranking is walked once taking the best member of each unseen zone, then
filled by score.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

# Members below this much free space take no new chunks.
DEFAULT_MIN_FREE = 1 << 30


class StorageMember(msgspec.Struct, frozen=True):
    node_id: str
    zone: str = ""
    capacity_bytes: int = 0
    free_bytes: int = 0
    power: Literal["ac", "battery"] = "ac"
    metered: bool = False
    alive: bool = True


class PlacementPolicy(msgspec.Struct, frozen=True):
    replicas: int = 2
    min_free_bytes: int = DEFAULT_MIN_FREE
    allow_battery: bool = False
    allow_metered: bool = False


class Rejection(msgspec.Struct, frozen=True):
    node_id: str
    reason: str


def eligible(members: Iterable[StorageMember], policy: PlacementPolicy) -> tuple[list[StorageMember], list[Rejection]]:
    """Members that may take new chunks, and why each other one may not."""
    ok: list[StorageMember] = []
    rejected: list[Rejection] = []
    for m in members:
        if not m.alive:
            rejected.append(Rejection(m.node_id, "not alive"))
        elif m.capacity_bytes <= 0:
            rejected.append(Rejection(m.node_id, "no storage capacity"))
        elif m.free_bytes < policy.min_free_bytes:
            rejected.append(Rejection(m.node_id, f"free {m.free_bytes} < {policy.min_free_bytes} bytes"))
        elif m.power == "battery" and not policy.allow_battery:
            rejected.append(Rejection(m.node_id, "on battery"))
        elif m.metered and not policy.allow_metered:
            rejected.append(Rejection(m.node_id, "metered network"))
        else:
            ok.append(m)
    return ok, rejected


def _unit_hash(digest: str, node_id: str) -> float:
    h = hashlib.blake2b(f"{digest}\0{node_id}".encode(), digest_size=8).digest()
    # Map to the open interval (0, 1): never 0 (ln 0) nor 1 (division by 0).
    return (int.from_bytes(h, "big") + 1) / (2**64 + 2)


def score(digest: str, member: StorageMember) -> float:
    return -float(member.capacity_bytes) / math.log(_unit_hash(digest, member.node_id))


def rank(digest: str, members: Sequence[StorageMember]) -> list[StorageMember]:
    """All `members`, best first, ties broken by node id (deterministic)."""
    return sorted(members, key=lambda m: (-score(digest, m), m.node_id))


def zone_spread(ranked: Sequence[StorageMember], count: int) -> list[StorageMember]:
    chosen: list[StorageMember] = []
    zones: set[str] = set()
    for m in ranked:
        if len(chosen) == count:
            break
        if m.zone not in zones:
            chosen.append(m)
            zones.add(m.zone)
    for m in ranked:
        if len(chosen) == count:
            break
        if m not in chosen:
            chosen.append(m)
    return chosen


def place(digest: str, members: Sequence[StorageMember], policy: PlacementPolicy = PlacementPolicy()) -> list[str]:
    """Node ids that should hold `digest`: up to `policy.replicas`, zone-spread."""
    ok, _ = eligible(members, policy)
    return [m.node_id for m in zone_spread(rank(digest, ok), policy.replicas)]


def candidates(digest: str, members: Sequence[StorageMember], policy: PlacementPolicy = PlacementPolicy()) -> list[str]:
    """Every eligible node, the placement targets first, then the rest by score:
    the order a writer falls back along when a target fails."""
    ok, _ = eligible(members, policy)
    ranked = rank(digest, ok)
    first = zone_spread(ranked, policy.replicas)
    return [m.node_id for m in first] + [m.node_id for m in ranked if m not in first]
