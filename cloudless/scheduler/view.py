"""What the scheduler reads: nodes as the scheduler sees them, and a read view
of the cluster indexed for placement.

`NodeInfo` is the scheduler's own picture of a node, independent of gossip's
types: the controller fills it from the registered node (region, zone,
labels), gossip metadata (capacity, power, network) and membership (state,
uptime, flaps).

`ClusterView` is an immutable snapshot. Construction indexes it once —
nodes sorted by id (so every replica of the controller sees the same order,
and tie-breaking is reproducible), capacity and reservations as flat lists,
per-attribute bitmasks — so each decision only does the per-node work that
depends on the workload. The attribute indexes are built lazily and
memoised; that is a cache of pure functions of the snapshot, not a change
to it. `with_allocations` derives the next snapshot after a plan commits
while sharing the node indexes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import compress, pairwise
from operator import attrgetter
from typing import Literal

import msgspec

from cloudless.errors import InvalidInput
from cloudless.state.workload import LIVE_STATES, Allocation, DeviceClass

MemberState = Literal["alive", "suspect", "dead", "left"]


class InvalidView(InvalidInput):
    """The controller built a view the scheduler cannot read (e.g. a node listed twice)."""


class NodeInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node_id: str
    state: MemberState = "alive"
    eligible: bool = True  # False while draining or cordoned: keeps its work, gets no new work
    region: str = ""
    zone: str = ""
    arch: str = "amd64"
    device_class: DeviceClass = "server"
    labels: dict[str, str] = {}
    cpu_millis: int = 0  # allocatable capacity for workloads
    memory_bytes: int = 0
    power: Literal["ac", "battery"] = "ac"
    battery_percent: int | None = None
    charging: bool = False
    network: Literal["wired", "wifi", "cellular"] = "wired"
    metered: bool = False
    uptime_s: float = 0.0
    flaps: int = 0  # suspect/dead transitions in gossip's recent window
    # What the node runs containers with (runc, rootless, memory, none); ""
    # when it has not said (an older node, or no metadata yet): not refused.
    runtime: str = ""


_EXTRACTORS: dict[str, Callable[[NodeInfo], str | None]] = {
    "node": attrgetter("node_id"),
    "node.id": attrgetter("node_id"),
    "node.region": lambda node: node.region or None,
    "node.zone": lambda node: node.zone or None,
    "node.arch": lambda node: node.arch or None,
    "node.class": attrgetter("device_class"),
    "node.power": attrgetter("power"),
    "node.network": attrgetter("network"),
    "node.metered": lambda node: "true" if node.metered else "false",
    "node.runtime": lambda node: node.runtime or None,
}


def _extractor(attribute: str) -> Callable[[NodeInfo], str | None]:
    if attribute.startswith("label."):
        key = attribute[6:]
        return lambda node: node.labels.get(key)
    try:
        return _EXTRACTORS[attribute]
    except KeyError:
        raise InvalidView(f"unknown node attribute {attribute!r}") from None


def attribute_value(node: NodeInfo, attribute: str) -> str | None:
    """The value a constraint, affinity or spread sees; None when the node lacks it."""
    return _extractor(attribute)(node)


_BITS = bytes.maketrans(b"01", b"\x00\x01")


def mask_indices(mask: int) -> list[int]:
    """Set bit positions of `mask`, ascending (C-speed: no per-bit Python loop)."""
    if not mask:
        return []
    flags = format(mask, "b")[::-1].encode().translate(_BITS)
    return list(compress(range(len(flags)), flags))


def mask_of(indices: Iterable[int], n: int) -> int:
    bits = bytearray((n + 7) // 8)
    for i in indices:
        bits[i >> 3] |= 1 << (i & 7)
    return int.from_bytes(bits, "little")


class AttributeIndex:
    """One attribute across all nodes: per-node values and (built on first use)
    a bitmask per value."""

    __slots__ = ("_masks", "values")

    def __init__(self, values: tuple[str | None, ...]) -> None:
        self.values = values
        self._masks: dict[str | None, int] | None = None

    @property
    def masks(self) -> dict[str | None, int]:
        if self._masks is None:
            positions: dict[str | None, list[int]] = {}
            for i, v in enumerate(self.values):
                at = positions.get(v)
                if at is None:
                    positions[v] = [i]
                else:
                    at.append(i)
            n = len(self.values)
            self._masks = {v: (1 << at[0]) if len(at) == 1 else mask_of(at, n) for v, at in positions.items()}
        return self._masks

    def matching(self, predicate) -> tuple[int, frozenset[str | None]]:  # type: ignore[no-untyped-def]
        """Mask of nodes whose value satisfies `predicate`, and the set of those values."""
        mask = 0
        values = []
        for value, m in self.masks.items():
            if predicate(value):
                mask |= m
                values.append(value)
        return mask, frozenset(values)


class ClusterView:
    """An immutable snapshot of nodes and live allocations, indexed for placement."""

    def __init__(self, nodes: Iterable[NodeInfo], allocations: Iterable[Allocation] = ()) -> None:
        ordered = sorted(nodes, key=lambda node: node.node_id)
        for a, b in pairwise(ordered):
            if a.node_id == b.node_id:
                raise InvalidView(f"node {a.node_id!r} appears twice in the view", node=a.node_id)
        self.nodes: tuple[NodeInfo, ...] = tuple(ordered)
        self.n = len(ordered)
        self.index: dict[str, int] = {node.node_id: i for i, node in enumerate(ordered)}
        self.all_mask = (1 << self.n) - 1
        self.cap_cpu: tuple[int, ...] = tuple(node.cpu_millis for node in ordered)
        self.cap_mem: tuple[int, ...] = tuple(node.memory_bytes for node in ordered)
        self.cap_cpu_f: tuple[float, ...] = tuple(float(c) for c in self.cap_cpu)
        self.cap_mem_f: tuple[float, ...] = tuple(float(c) for c in self.cap_mem)
        by_state: dict[str, list[int]] = {}
        for i, node in enumerate(ordered):
            if node.state != "alive":
                key = node.state
            elif not node.eligible:
                key = "ineligible"
            elif node.cpu_millis <= 0 or node.memory_bytes <= 0:
                key = "no_capacity"  # e.g. its gossip metadata has not arrived yet
            else:
                key = "alive"
            by_state.setdefault(key, []).append(i)
        self.state_masks: dict[str, int] = {k: mask_of(v, self.n) for k, v in by_state.items()}
        self.ready_mask = self.state_masks.get("alive", 0)
        self._attributes: dict[str, AttributeIndex] = {}
        self._memo: dict[tuple, object] = {}  # type: ignore[type-arg]
        self._set_allocations({}, [0] * self.n, [0] * self.n)
        for allocation in allocations:
            self._add(allocation)

    # -- allocations ----------------------------------------------------------

    def _set_allocations(self, allocations: dict[str, Allocation], used_cpu: list[int], used_mem: list[int]) -> None:
        self.allocations: dict[str, Allocation] = allocations
        self.used_cpu = used_cpu
        self.used_mem = used_mem
        # node index -> {(port, proto): count}; workload -> {node index: live replicas}
        self.ports: dict[int, dict[tuple[int, str], int]] = {}
        self.placed: dict[str, dict[int, int]] = {}
        self.by_workload: dict[str, dict[str, Allocation]] = {}
        self._free: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._used_f: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._owned: set[tuple[str, object]] = set()  # inner containers this snapshot copied (copy on write)

    def _inner(self, table: dict, key: object, kind: str) -> dict:  # type: ignore[type-arg]
        """table[key] as a container this snapshot may write (copied from the parent on first write)."""
        inner = table.get(key)
        if inner is None:
            inner = table[key] = {}
            self._owned.add((kind, key))
        elif (kind, key) not in self._owned:
            inner = table[key] = dict(inner)
            self._owned.add((kind, key))
        return inner

    def _add(self, allocation: Allocation) -> None:
        if allocation.state not in LIVE_STATES:
            return
        if allocation.id in self.allocations:
            raise InvalidView(f"allocation {allocation.id!r} appears twice in the view", allocation=allocation.id)
        self.allocations[allocation.id] = allocation
        self._inner(self.by_workload, allocation.workload, "w")[allocation.id] = allocation
        i = self.index.get(allocation.node)
        if i is None:
            return  # its node left the view: it reserves nothing the scheduler could use
        self.used_cpu[i] += allocation.resources.cpu_millis
        self.used_mem[i] += allocation.resources.memory_bytes
        for port in allocation.ports:
            if port.host_port is not None:
                ports = self._inner(self.ports, i, "p")
                key = (port.host_port, port.protocol)
                ports[key] = ports.get(key, 0) + 1
        per_node = self._inner(self.placed, allocation.workload, "n")
        per_node[i] = per_node.get(i, 0) + 1

    def _remove(self, allocation: Allocation) -> None:
        del self.allocations[allocation.id]
        by_id = self._inner(self.by_workload, allocation.workload, "w")
        del by_id[allocation.id]
        if not by_id:
            del self.by_workload[allocation.workload]
        i = self.index.get(allocation.node)
        if i is None:
            return
        self.used_cpu[i] -= allocation.resources.cpu_millis
        self.used_mem[i] -= allocation.resources.memory_bytes
        for port in allocation.ports:
            if port.host_port is not None:
                ports = self._inner(self.ports, i, "p")
                key = (port.host_port, port.protocol)
                ports[key] -= 1
                if not ports[key]:
                    del ports[key]
                if not ports:
                    del self.ports[i]
        per_node = self._inner(self.placed, allocation.workload, "n")
        per_node[i] -= 1
        if not per_node[i]:
            del per_node[i]
        if not per_node:
            del self.placed[allocation.workload]

    def with_allocations(self, upsert: Iterable[Allocation] = (), remove: Iterable[str] = ()) -> ClusterView:
        """The next snapshot: same nodes, allocations added, replaced (by id) or
        removed; terminal ones drop out. Costs O(nodes + changes): containers
        are shared with this snapshot and copied on first write."""
        view = object.__new__(ClusterView)
        for slot in (
            "nodes",
            "n",
            "index",
            "all_mask",
            "cap_cpu",
            "cap_mem",
            "state_masks",
            "ready_mask",
            "cap_cpu_f",
            "cap_mem_f",
            "_attributes",
            "_memo",
        ):
            setattr(view, slot, getattr(self, slot))
        view._set_allocations(dict(self.allocations), list(self.used_cpu), list(self.used_mem))
        view.ports = dict(self.ports)
        view.placed = dict(self.placed)
        view.by_workload = dict(self.by_workload)
        for alloc_id in remove:
            old = view.allocations.get(alloc_id)
            if old is not None:
                view._remove(old)
        for allocation in upsert:
            old = view.allocations.get(allocation.id)
            if old is not None:
                view._remove(old)
            view._add(allocation)
        return view

    def free(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(free cpu, free memory) per node; computed once (the snapshot is immutable once built)."""
        if self._free is None:
            self._free = (
                tuple(c - u for c, u in zip(self.cap_cpu, self.used_cpu, strict=True)),
                tuple(c - u for c, u in zip(self.cap_mem, self.used_mem, strict=True)),
            )
        return self._free

    def used_floats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self._used_f is None:
            self._used_f = (tuple(float(u) for u in self.used_cpu), tuple(float(u) for u in self.used_mem))
        return self._used_f

    def live_allocations(self, workload: str) -> list[Allocation]:
        """Live allocations of `workload`, including those on nodes no longer in the view."""
        return list(self.by_workload.get(workload, {}).values())

    # -- node indexes (memoised) ---------------------------------------------

    def attribute(self, attribute: str) -> AttributeIndex:
        index = self._attributes.get(attribute)
        if index is None:
            index = AttributeIndex(tuple(map(_extractor(attribute), self.nodes)))
            self._attributes[attribute] = index
        return index

    def memo(self, key: tuple, compute):  # type: ignore[no-untyped-def,type-arg]
        """Memoise a pure per-node derivation (scorers' static parts) on this snapshot's nodes."""
        value = self._memo.get(key, _MISSING)
        if value is _MISSING:
            value = compute()
            self._memo[key] = value
        return value


_MISSING = object()
