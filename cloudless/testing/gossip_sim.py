"""Thousands of gossip cores in one process, in virtual time.

A seeded discrete-event simulation (no trio): one heap of timestamped
deliveries and timers drives `GossipCore`s directly. Faults: packet loss,
partitions, crashes, joins, graceful leaves, and stalls (a member that
processes nothing for a while, as a loaded phone does; packets wait in its
socket buffer and its timers fire late, all at once, when it wakes).

Every run is reproducible from `SimConfig.seed`. What it measures, for each
crash: the first member to mark it dead and the moment every live member has;
for each join: the moment every live member knows the joiner; false
positives (live members declared dead by anyone); bytes sent per member per
second (UDP payload as sealed on the wire, plus push-pull stream bytes).
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import logging
import math
import random
import statistics
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from cloudless.gossip.claims import SelfClaims, VerificationCache, ecdsa_signer
from cloudless.gossip.core import GossipConfig, GossipCore
from cloudless.gossip.events import MemberDead, MemberJoined, MemberLeft, PushPull, StreamProbe
from cloudless.gossip.keyring import Keyring, PacketSealer
from cloudless.gossip.members import SUSPECT
from cloudless.gossip.messages import SEAL_OVERHEAD, MalformedPacket

log = logging.getLogger(__name__)

_DELIVER, _TIMER, _KILL, _JOIN, _STALL, _WAKE, _PROBE_RESULT, _PUSH_PULL, _PP_RESULT, _LEAVE, _PARTITION = range(11)


@dataclass
class SimConfig:
    nodes: int
    seed: int = 1
    duration: float = 60.0
    loss: float = 0.0
    latency: tuple[float, float] = (0.001, 0.010)
    kills: int = 0
    joins: int = 0
    leaves: int = 0
    stall_fraction: float = 0.0
    stall_duration: float = 2.0
    stall_every: float = 10.0
    lifeguard: bool = True
    # Off by default: sealing costs ~70% more simulation CPU and changes no
    # protocol behaviour; byte counts include the 49-byte seal either way.
    seal: bool = False
    # Members sign their alive/leave claims and verify each other's
    # (gossip/claims.py) with keys derived from the seed; one verification
    # cache serves every core, so each distinct claim is checked once.
    signed: bool = False
    warmup: float = 5.0  # faults start after this
    settle: float = 15.0  # and stop this long before the end, so effects can be observed
    gossip: GossipConfig | None = None
    # (start, end, groups): from start to end, member i can reach only members
    # with the same i % groups (datagrams, probes and streams alike).
    partitions: list[tuple[float, float, int]] = field(default_factory=list)


@dataclass
class SimResult:
    seed: int
    nodes: int
    detect_first: list[float]
    detect_all: list[float | None]
    join_all: list[float | None]
    false_positive_members: set[str]
    false_positives_stalled: int
    false_positive_pairs: int
    bytes_per_node_s: float
    packets: int
    virtual_seconds: float
    undetected: int
    unconverged_joins: int
    left_all: list[float | None]
    views_agree: bool
    disagreements: int

    def summary(self) -> dict[str, object]:
        def pct(xs: list[float | None], q: float) -> float | None:
            vals = sorted(x for x in xs if x is not None)
            if not vals:
                return None
            if len(vals) < len(xs):
                return None  # some crash or join never converged: see "undetected"
            k = min(len(vals) - 1, max(0, math.ceil(q * len(vals)) - 1))
            return round(vals[k], 3)

        return {
            "nodes": self.nodes,
            "seed": self.seed,
            "detect_first_s": round(statistics.median(self.detect_first), 3) if self.detect_first else None,
            "detect_all_p50_s": pct(self.detect_all, 0.5),
            "detect_all_p95_s": pct(self.detect_all, 0.95),
            "join_all_p95_s": pct(self.join_all, 0.95),
            "false_positives": len(self.false_positive_members),
            "false_positives_stalled": self.false_positives_stalled,
            "bytes_per_node_s": round(self.bytes_per_node_s, 1),
            "undetected": self.undetected,
        }


class _Node:
    __slots__ = ("backlog", "core", "group", "joined_at", "sealer", "stalled_until", "timer_at", "up")

    def __init__(self, core: GossipCore, joined_at: float) -> None:
        self.core = core
        self.up = True
        self.stalled_until = 0.0
        self.backlog: list[tuple[bytes, str]] = []
        self.timer_at = math.inf
        self.joined_at = joined_at
        self.sealer: PacketSealer | None = None
        self.group = 0


class GossipSimulation:
    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        gcfg = config.gossip or GossipConfig()
        if gcfg.lifeguard != config.lifeguard:
            gcfg = dataclasses.replace(gcfg, lifeguard=config.lifeguard)
        self.gcfg = gcfg
        self.now = 0.0
        self._heap: list[tuple] = []
        self._seq = 0
        self.nodes: list[_Node] = []
        self.by_addr: dict[str, int] = {}
        self.bytes_sent = 0
        self.packets = 0
        self.kill_times: dict[str, float] = {}
        self.join_times: dict[str, float] = {}
        self.leave_times: dict[str, float] = {}
        # Who knew a member when it crashed or left: only they can notice
        # (a member still joining may never have heard of it, rightly).
        self.knew: dict[str, set[str]] = {}
        self.stalled_names: set[str] = set()
        self.first_dead: dict[str, dict[str, float]] = {}  # target -> observer -> t
        self.first_joined: dict[str, dict[str, float]] = {}
        self.fp_members: set[str] = set()
        self.fp_pairs = 0
        self.partition_active = False
        self._key = bytes(range(32))
        self._public_keys: dict[str, tuple] = {}
        self._claims_cache = VerificationCache(size=1 << 20)

    # ------------------------------------------------------------- set-up

    def _new_core(self, i: int, t: float) -> GossipCore:
        name = f"n{i}"
        claims = None
        if self.cfg.signed:
            # Registered before it gossips, as enrollment registers a node in Raft first.
            key = ec.derive_private_key(random.Random(f"{self.cfg.seed}/{name}").getrandbits(255) + 1, ec.SECP256R1())
            self._public_keys[name] = (key.public_key(),)
            claims = SelfClaims("sim", ecdsa_signer(key), self._public_keys.get, self._claims_cache)
        core = GossipCore(
            name,
            f"{name}:7946",
            rng=random.Random(self.cfg.seed * 1_000_003 + i),
            now=t,
            config=self.gcfg,
            claims=claims,
        )
        return core

    def _add_node(self, core: GossipCore, t: float) -> int:
        i = len(self.nodes)
        node = _Node(core, t)
        if self.cfg.seal:
            node.sealer = PacketSealer(
                Keyring(self._key), sender_id=i.to_bytes(8, "big"), random_bytes=self.rng.randbytes
            )
        self.nodes.append(node)
        self.by_addr[core.addr] = i
        return i

    def _push(self, t: float, kind: int, i: int, data: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, i, data))

    def _schedule_faults(self) -> None:
        cfg, rng = self.cfg, self.rng
        lo, hi = cfg.warmup, max(cfg.warmup, cfg.duration - cfg.settle)
        n = cfg.nodes
        # Distinct victims; stalled members are never killed so their metrics stay apart.
        stall_count = round(cfg.stall_fraction * n)
        order = list(range(n))
        rng.shuffle(order)
        stalled = order[:stall_count]
        rest = order[stall_count:]
        victims = rest[: cfg.kills]
        leavers = rest[cfg.kills : cfg.kills + cfg.leaves]
        for k, i in enumerate(victims):
            self._push(lo + (hi - lo) * (k + rng.random()) / max(1, cfg.kills), _KILL, i)
        for k, i in enumerate(leavers):
            self._push(lo + (hi - lo) * (k + rng.random()) / max(1, cfg.leaves), _LEAVE, i)
        for k in range(cfg.joins):
            self._push(lo + (hi - lo) * (k + rng.random()) / max(1, cfg.joins), _JOIN, -1)
        for i in stalled:
            self.stalled_names.add(self.nodes[i].core.name)
            t = lo + rng.random() * cfg.stall_every
            while t < hi:
                self._push(t, _STALL, i)
                t += cfg.stall_every
        for start, end, groups in cfg.partitions:
            self._push(start, _PARTITION, groups)
            self._push(end, _PARTITION, 1)

    # ------------------------------------------------------------------ run

    def run(self) -> SimResult:
        self.start()
        self.advance(self.cfg.duration)
        return self._result()

    def start(self) -> None:
        """Warm start: every member already knows every other (no join storm)."""
        cfg = self.cfg
        cores = [self._new_core(i, 0.0) for i in range(cfg.nodes)]
        shared = [core.self_claim() for core in cores]
        for core in cores:
            core.bootstrap_members(shared, 0.0)
            self._add_node(core, 0.0)
        for i in range(cfg.nodes):
            self._after(i)
        self._schedule_faults()

    def advance(self, until: float) -> None:
        gc_was = gc.isenabled()
        gc.disable()  # millions of short-lived packets, no cycles: the collector only costs time
        try:
            self._loop(until)
        finally:
            if gc_was:
                gc.enable()

    def views_agree(self) -> bool:
        """Every live member sees exactly the live members as live."""
        live = {n.core.name for n in self.nodes if n.up}
        return all({m.name for m in n.core.live_members()} == live for n in self.nodes if n.up)

    def result(self) -> SimResult:
        return self._result()

    def _loop(self, until: float) -> None:
        heap = self._heap
        nodes = self.nodes
        pop = heapq.heappop
        while heap and heap[0][0] <= until:
            t, _, kind, i, data = pop(heap)
            self.now = t
            if kind == _DELIVER:
                node = nodes[i]
                if not node.up:
                    continue
                if node.stalled_until > t:
                    node.backlog.append(data)
                    continue
                self._deliver(i, data, t)
                self._after(i)
            elif kind == _TIMER:
                node = nodes[i]
                if not node.up or node.timer_at != t:
                    continue
                node.timer_at = math.inf
                if node.stalled_until > t:
                    continue  # re-armed when it wakes
                node.core.handle_timer(t)
                self._after(i)
            elif kind == _PROBE_RESULT:
                node = nodes[i]
                if node.up and node.stalled_until <= t:
                    seq, ok = data
                    node.core.stream_probe_result(seq, ok, t)
                    self._after(i)
            elif kind == _PUSH_PULL:
                self._push_pull(i, data, t)
            elif kind == _PP_RESULT:
                node = nodes[i]
                if node.up and node.stalled_until <= t:
                    addr, reply = data
                    node.core.stream_exchange_result(addr, reply, t)
                    self._after(i)
            elif kind == _KILL:
                node = nodes[i]
                if node.up:
                    node.up = False
                    self.kill_times[node.core.name] = t
                    self.knew.setdefault(node.core.name, self._knowing(node.core.name))
            elif kind == _STALL:
                node = nodes[i]
                if node.up:
                    node.stalled_until = t + self.cfg.stall_duration
                    self._push(node.stalled_until, _WAKE, i)
            elif kind == _WAKE:
                self._wake(i, t)
            elif kind == _JOIN:
                self._join(t)
            elif kind == _LEAVE:
                node = nodes[i]
                if node.up:
                    self.leave_times[node.core.name] = t
                    self.knew[node.core.name] = self._knowing(node.core.name)
                    node.core.leave(t)
                    self._after(i)
                    self._push(t + 2.0, _KILL, i)  # the process exits after announcing
            elif kind == _PARTITION:
                self._partition(i)
        self.now = until

    def _deliver(self, i: int, data: tuple[bytes, str], t: float) -> None:
        node = self.nodes[i]
        packet, src = data
        if node.sealer is not None:
            packet = node.sealer.open(packet)
        try:
            node.core.receive(packet, src, t)
        except MalformedPacket:  # pragma: no cover - the sim sends only what cores produce
            log.exception("gossip_sim.malformed", extra={"node": i})

    def _wake(self, i: int, t: float) -> None:
        node = self.nodes[i]
        if not node.up:
            return
        # Timers that expired during the stall fire first, then the backlog is
        # read: the pathological order that makes a slow member accuse others.
        node.core.handle_timer(t)
        backlog, node.backlog = node.backlog, []
        for data in backlog:
            self._deliver(i, data, t)
        self._after(i)

    def _partition(self, groups: int) -> None:
        self.partition_active = groups > 1
        for k, node in enumerate(self.nodes):
            node.group = k % groups if groups > 1 else 0

    def _join(self, t: float) -> None:
        live = [k for k, n in enumerate(self.nodes) if n.up and n.stalled_until <= t]
        i = len(self.nodes)
        core = self._new_core(i, t)
        self._add_node(core, t)
        self.join_times[core.name] = t
        seed = self.nodes[self.rng.choice(live)].core.addr
        core.join([seed], t)
        self._after(i)

    def _push_pull(self, i: int, data: tuple[int, bytes, bool], t: float) -> None:
        origin, payload, _join = data
        node = self.nodes[i]
        lat = self._latency()
        if not node.up or node.stalled_until > t or self._cut(origin, i):
            # The stream times out on the initiator's side.
            self._push(t + 1.0, _PP_RESULT, origin, (node.core.addr, None))
            return
        reply = node.core.handle_push_pull(payload, t)
        self.bytes_sent += len(payload) + len(reply)
        self._after(i)
        self._push(t + lat, _PP_RESULT, origin, (node.core.addr, reply))

    def _cut(self, a: int, b: int) -> bool:
        return self.partition_active and self.nodes[a].group != self.nodes[b].group

    def _latency(self) -> float:
        lo, hi = self.cfg.latency
        return lo + (hi - lo) * self.rng.random()

    def _after(self, i: int) -> None:
        """Route a core's outputs into the event queue and re-arm its timer."""
        node = self.nodes[i]
        core = node.core
        t = self.now
        out = core._out
        if out:
            core._out = []
            rng = self.rng
            loss = self.cfg.loss
            lo, span = self.cfg.latency[0], self.cfg.latency[1] - self.cfg.latency[0]
            by_addr = self.by_addr
            src = core.addr
            sealer = node.sealer
            part = self.partition_active
            for addr, packet in out:
                if sealer is not None:
                    packet = sealer.seal(packet)
                    self.bytes_sent += len(packet)
                else:
                    self.bytes_sent += len(packet) + SEAL_OVERHEAD
                self.packets += 1
                if loss and rng.random() < loss:
                    continue
                j = by_addr.get(addr)
                if j is None or (part and self.nodes[j].group != node.group):
                    continue
                self._seq += 1
                heapq.heappush(self._heap, (t + lo + span * rng.random(), self._seq, _DELIVER, j, (packet, src)))
        if core._effects:
            for eff in core.effects_to_run():
                if type(eff) is StreamProbe:
                    j = self.by_addr.get(eff.addr)
                    ok = j is not None and self.nodes[j].up and self.nodes[j].stalled_until <= t and not self._cut(i, j)
                    if ok:  # a reliable stream: no loss, a round trip or two
                        self._push(t + 3 * self._latency(), _PROBE_RESULT, i, (eff.seq, True))
                elif type(eff) is PushPull:
                    j = self.by_addr.get(eff.addr)
                    if j is None:
                        self._push(t + 1.0, _PP_RESULT, i, (eff.addr, None))
                    else:
                        self._push(t + self._latency(), _PUSH_PULL, j, (i, eff.payload, eff.join))
        if core._events:
            self._record(core, t)
        d = core.next_deadline()
        if d is not None and d < node.timer_at:
            d = max(d, t)
            node.timer_at = d
            self._seq += 1
            heapq.heappush(self._heap, (d, self._seq, _TIMER, i, None))

    def _knowing(self, name: str) -> set[str]:
        out = set()
        for n in self.nodes:
            if n.up and n.core.name != name:
                m = n.core.members.rows.get(name)
                if m is not None and m.state <= SUSPECT:
                    out.add(n.core.name)
        return out

    def _record(self, core: GossipCore, t: float) -> None:
        observer = core.name
        for ev in core.events():
            et = type(ev)
            if et is MemberDead or et is MemberLeft:
                name = ev.name
                per = self.first_dead.get(name)
                if per is None:
                    per = self.first_dead[name] = {}
                if observer not in per:
                    per[observer] = t
                if et is MemberDead and name not in self.kill_times:
                    j = self.by_addr.get(f"{name}:7946")
                    if j is not None and self.nodes[j].up and name not in self.leave_times:
                        self.fp_members.add(name)
                        self.fp_pairs += 1
            elif et is MemberJoined:
                if ev.name in self.join_times:
                    per = self.first_joined.setdefault(ev.name, {})
                    per.setdefault(observer, t)

    # -------------------------------------------------------------- results

    def _result(self) -> SimResult:
        end = self.now
        survivors = [n for n in self.nodes if n.up]
        detect_first: list[float] = []
        detect_all: list[float | None] = []
        undetected = 0
        for name, tk in sorted(self.kill_times.items(), key=lambda kv: kv[1]):
            if name in self.leave_times:
                continue
            per = self.first_dead.get(name, {})
            knew = self.knew.get(name, set())
            observers = [n.core.name for n in survivors if n.joined_at <= tk and n.core.name in knew]
            times = [per.get(o) for o in observers]
            seen = [x for x in times if x is not None]
            if seen:
                detect_first.append(min(seen) - tk)
            if len(seen) == len(times):
                detect_all.append(max(seen) - tk if seen else 0.0)
            else:
                detect_all.append(None)
                undetected += 1
        left_all: list[float | None] = []
        for name, tl in self.leave_times.items():
            per = self.first_dead.get(name, {})
            knew = self.knew.get(name, set())
            observers = [n.core.name for n in survivors if n.joined_at <= tl and n.core.name in knew]
            observed = [per[o] for o in observers if o in per]
            left_all.append(max(observed) - tl if observers and len(observed) == len(observers) else None)
        join_all: list[float | None] = []
        unconverged = 0
        for name, tj in self.join_times.items():
            per = self.first_joined.get(name, {})
            observers = [n.core.name for n in survivors if n.joined_at < tj]
            observed = [per[o] for o in observers if o in per]
            if len(observed) < len(observers):
                join_all.append(None)
                unconverged += 1
            else:
                join_all.append(max(observed) - tj if observed else 0.0)
        live_names = {n.core.name for n in survivors}
        disagreements = 0
        for n in survivors:
            view = {m.name for m in n.core.live_members()}
            if view != live_names:
                disagreements += 1
        node_seconds = sum(
            max(0.0, (end if n.up else self.kill_times.get(n.core.name, end)) - n.joined_at) for n in self.nodes
        )
        return SimResult(
            seed=self.cfg.seed,
            nodes=self.cfg.nodes,
            detect_first=detect_first,
            detect_all=detect_all,
            join_all=join_all,
            false_positive_members=set(self.fp_members),
            false_positives_stalled=len(self.fp_members & self.stalled_names),
            false_positive_pairs=self.fp_pairs,
            bytes_per_node_s=self.bytes_sent / node_seconds if node_seconds else 0.0,
            packets=self.packets,
            virtual_seconds=end,
            undetected=undetected,
            unconverged_joins=unconverged,
            left_all=left_all,
            views_agree=disagreements == 0,
            disagreements=disagreements,
        )


def simulate(config: SimConfig) -> SimResult:
    return GossipSimulation(config).run()
