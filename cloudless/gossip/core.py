"""SWIM membership with Lifeguard, as a sans-IO state machine.

Inputs: `receive(payload, from_addr, now)`, `handle_timer(now)`,
`join(seeds, now)`, `leave(now)`, `update_metadata(meta, now)`,
`handle_push_pull(payload, now)` (the remote side of a state exchange),
`stream_exchange_result(...)` and `stream_probe_result(...)`.
Outputs, pulled: `packets_to_send()`, `next_event()`, `effects_to_run()`,
`next_deadline()`.

Papers: SWIM (Das, Gupta, Motivala 2002) §4 for probing, suspicion and
piggybacked dissemination; Lifeguard (Dadgar, Phillips, Currey 2018) §4 for
local health, suspicion timeouts that shrink with confirmations and the buddy
system. The split follows hashicorp/memberlist (awareness.py, suspicion.py,
members.py), with deadlines in place of its goroutines and timers.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from cloudless.gossip import messages as wire
from cloudless.gossip.awareness import Awareness
from cloudless.gossip.claims import CLAIM_ALIVE, CLAIM_LEFT, SelfClaims
from cloudless.gossip.events import (
    Effect,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MembershipEvent,
    MemberSuspect,
    MemberUpdated,
    PushPull,
    StreamProbe,
)
from cloudless.gossip.members import ALIVE, DEAD, LEFT, SUSPECT, Member, MemberTable
from cloudless.gossip.messages import Ack, Alive, Dead, IndirectPing, Nack, Ping, Suspect
from cloudless.gossip.metadata import EMPTY_METADATA, Metadata, validate_size
from cloudless.gossip.suspicion import Suspicion, suspicion_bounds

log = logging.getLogger(__name__)

# How long a member that pings us may stay unknown before we ask it for state:
# long enough that ordinary gossip about a joiner arrives first.
STRANGER_GRACE = 2.0

# Members waiting for an out-of-turn probe (see `_probe_early`); beyond this,
# hints are dropped and the round-robin order finds them.
MAX_EARLY_PROBES = 8

# How far above what we know of a member an incarnation may jump in one
# unsigned claim, and how far a member lets an accusation push its own
# incarnation. Honest jumps are a few; a forged accusation at the maximum
# incarnation would otherwise outrank every refutation for good, and 2**63
# in steps of this size is out of any sender's reach.
INCARNATION_WINDOW = 1024


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Protocol parameters. Defaults are tuned for 5,000 members on a LAN/WAN
    mix (see benchmarks/gossip.py); memberlist's LAN profile is 1 s / 500 ms /
    200 ms x 3 / suspicion mult 4."""

    probe_interval: float = 0.4
    probe_timeout: float = 0.15
    indirect_checks: int = 3
    gossip_interval: float = 0.1
    gossip_nodes: int = 4
    gossip_to_the_dead: float = 10.0
    retransmit_mult: int = 4
    suspicion_mult: float = 0.75
    suspicion_max_mult: float = 5.0
    suspicion_floor: float = 0.5
    expected_confirmations: int = 3
    # Members hearing a suspicion probe the suspect out of turn (see _on_suspect).
    early_confirmations: bool = True
    awareness_max: int = 8
    push_pull_interval: float = 30.0
    reconnect_interval: float = 10.0
    tombstone_ttl: float = 60.0
    max_queue_depth: int = 1024
    stream_fallback: bool = True
    lifeguard: bool = True
    max_payload: int = wire.MAX_PAYLOAD


class _Probe:
    __slots__ = ("ack_deadline", "end", "expected_nacks", "indirect", "nacks", "seq", "start", "target")

    def __init__(self, target: Member, seq: int, start: float, ack_deadline: float, end: float) -> None:
        self.target = target
        self.seq = seq
        self.start = start
        self.ack_deadline = ack_deadline
        self.end = end
        self.indirect = False
        self.expected_nacks = 0
        self.nacks = 0


class _Relay:
    """An indirect ping we forward for another member (SWIM §3.1 ping-req)."""

    __slots__ = ("expires", "nack_at", "seq", "source_addr")

    def __init__(self, source_addr: str, seq: int, nack_at: float | None, expires: float) -> None:
        self.source_addr = source_addr
        self.seq = seq
        self.nack_at = nack_at
        self.expires = expires


class _Broadcast:
    __slots__ = ("data", "order", "transmits")

    def __init__(self, data: bytes, order: int) -> None:
        self.data = data
        self.transmits = 0
        self.order = order


def _pushpull_scale(interval: float, n: int) -> float:
    # memberlist pushPullScale: stretch the interval as the cluster grows so
    # full-state exchanges stay a fixed load per member.
    threshold = 32
    if n <= threshold:
        return interval
    return interval * math.ceil(math.log2(n) - math.log2(threshold) + 1.0)


class GossipCore:
    def __init__(
        self,
        name: str,
        addr: str,
        *,
        rng: random.Random,
        now: float,
        config: GossipConfig = GossipConfig(),
        meta: Metadata = EMPTY_METADATA,
        claims: SelfClaims | None = None,
    ) -> None:
        self.name = name
        self.addr = addr
        self.config = config
        self.rng = rng
        self.incarnation = 0
        self.meta = validate_size(meta)
        self.meta_version = 0
        self.leaving = False
        self.members = MemberTable()
        # With `claims`, a member's own alive/leave must carry its signature
        # (claims.py); without, every member's word is taken (simulations).
        self.claims = claims
        # Last verified incarnation and the signature that proved it, per
        # member, so push-pull rows carry it on (only kept with `claims`).
        self._verified: dict[str, int] = {}
        self._sigs: dict[str, bytes] = {}
        self._self_sig = b""
        self.awareness = Awareness(config.awareness_max, enabled=config.lifeguard)
        self._now = now
        self._seq = rng.randrange(1 << 31)
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._queue: dict[str, _Broadcast] = {}
        self._order = 0
        self._out: list[tuple[str, bytes]] = []
        self._events: deque[MembershipEvent] = deque()
        self._effects: list[Effect] = []
        self._stream_probes: set[int] = set()
        # Out-of-turn probes, in the order asked for, and when each member was
        # last asked for (at most one early probe of a member per interval).
        self._early: dict[str, float] = {}
        self._early_asked: dict[str, float] = {}
        # Stagger periodic work so members started together do not beat in step.
        self._next_probe = now + rng.random() * config.probe_interval
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._next_push_pull = now + config.push_pull_interval * (0.5 + rng.random())
        self._next_reap = now + config.tombstone_ttl / 4
        self._next_reconnect = now + config.reconnect_interval * (0.5 + rng.random())
        self._self_alive = b""
        self._joining = False
        self._min_stall = 2 * config.probe_interval
        # Members that pinged us before we heard of them: if gossip still has
        # not told us about one after a while, ask it directly (push-pull).
        self._strangers: dict[str, tuple[str, float]] = {}
        self.stats = {
            "packets_in": 0,
            "packets_out": 0,
            "bytes_out": 0,
            "refutations": 0,
            "suspected": 0,
            # Self-claims dropped: a bad or missing signature of a registered
            # member, or an unsigned incarnation jump past INCARNATION_WINDOW.
            "claims_rejected": 0,
            # Observations (suspect/dead) naming an incarnation above the one
            # the member itself signed, read as being about that one.
            "observations_clamped": 0,
        }
        self.members.add(Member(name, addr, 0, ALIVE, now, 0, self.meta), rng)
        self._encode_self()

    # ----------------------------------------------------------------- inputs

    def bootstrap_members(self, records: Iterable[Alive], now: float) -> None:
        """Start from a known membership (a persisted member list, or a
        simulation's warm start): rows are added without events or gossip."""
        rows = self.members.rows
        fresh = [
            Member(a.node, a.addr, a.incarnation, ALIVE, 0.0, a.meta_version, a.meta)
            for a in records
            if a.node not in rows and a.node != self.name
        ]
        claims = self.claims
        if claims is not None:
            # Keep the signatures that verify, so push-pull can pass them on.
            for a in records:
                if a.sig and a.node != self.name:
                    ok = claims.verify(a.node, a.incarnation, CLAIM_ALIVE, a.meta_version, a.addr, a.meta, a.sig)
                    if ok:
                        self._verified[a.node] = a.incarnation
                        self._sigs[a.node] = a.sig
        self.members.add_many(fresh, self.rng)
        self._now = now
        self._next_push_pull = now + self.rng.random() * _pushpull_scale(
            self.config.push_pull_interval, self.members.live_count
        )

    def join(self, seeds: Iterable[str], now: float) -> None:
        """Exchange state with each seed; any one answering is enough (SWIM §5)."""
        self._now = now
        payload = self._state_payload(join=True)
        for addr in seeds:
            if addr != self.addr:
                self._effects.append(PushPull(addr, payload, True))
        self._queue_broadcast(self.name, self._self_alive)
        self._joining = True

    def leave(self, now: float) -> None:
        """Announce a graceful leave: others mark us left, not dead."""
        self._now = now
        self.leaving = True
        self._probe = None
        me = self.members.rows[self.name]
        self.members.set_state(me, LEFT, now)
        if self.claims is not None:
            self._self_sig = self._sigs[self.name] = self.claims.sign(
                self.name, self.incarnation, CLAIM_LEFT, 0, "", None
            )
        data = wire.encode(Dead(self.incarnation, self.name, self.name, self._self_sig))
        self._queue_broadcast(self.name, data)
        # Do not wait for the next gossip round: tell a few members right away.
        for m in self.members.random_members(self.rng, self.config.gossip_nodes, (self.name,)):
            self._send(m.addr, data)

    def self_claim(self) -> Alive:
        """This member's current alive claim (signed when claims are on)."""
        return Alive(self.incarnation, self.name, self.addr, self.meta_version, self.meta, self._self_sig)

    @property
    def leave_announced(self) -> bool:
        """True once the leave went straight to `gossip_nodes` members and at
        least one gossip round carried it on."""
        b = self._queue.get(self.name)
        return self.leaving and (b is None or b.transmits >= 1)

    def update_metadata(self, meta: Metadata, now: float) -> None:
        self._now = now
        self.meta = validate_size(meta)
        self.meta_version += 1
        me = self.members.rows[self.name]
        me.meta, me.meta_version = self.meta, self.meta_version
        self._encode_self()
        self._queue_broadcast(self.name, self._self_alive)

    def hint_unreachable(self, name: str, now: float) -> bool:
        """A transport saw its connection to `name` fail (the kernel resets a
        killed process's sockets at once). Probe that member out of turn; the
        hint never makes anyone suspect by itself, only a failed probe does.
        True if a probe was scheduled."""
        self._advance(now)
        return self._probe_early(name, now)

    def receive(self, payload: bytes, from_addr: str, now: float) -> None:
        """Handle one (already unsealed) packet. Raises MalformedPacket, having
        changed nothing, if it does not decode."""
        msgs = wire.decode_packet(payload)
        self._advance(now)
        self.stats["packets_in"] += 1
        for msg in msgs:
            t = type(msg)
            if t is Ping:
                self._on_ping(msg, from_addr)
            elif t is Ack:
                self._on_ack(msg, now)
            elif t is Alive:
                self._on_alive(msg, now, True)
            elif t is Suspect:
                self._on_suspect(msg, now, True)
            elif t is Dead:
                self._on_dead(msg, now, True)
            elif t is IndirectPing:
                self._on_indirect_ping(msg, now)
            elif t is Nack:
                p = self._probe
                if p is not None and p.seq == msg.seq:
                    p.nacks += 1

    def handle_timer(self, now: float) -> None:
        cfg = self.config
        self._advance(now)
        p = self._probe
        if p is not None:
            if not p.indirect and now >= p.ack_deadline:
                self._start_indirect(p, now)
            if p.indirect and now >= p.end:
                self._probe_failed(p, now)
        if not self.leaving and now >= self._next_probe:
            if self._probe is not None:  # an old probe still open only if timers ran late
                self._probe_failed(self._probe, now)
            self._next_probe = now + self.awareness.scale(cfg.probe_interval)
            self._start_probe(now)
        if self._relays:
            self._expire_relays(now)
        if self._strangers:
            self._check_strangers(now)
        if now >= self._next_gossip:
            self._next_gossip = now + cfg.gossip_interval
            if self._queue:
                self._gossip(now)
        if self._suspicions:
            for name, s in list(self._suspicions.items()):
                if now >= s.deadline:
                    del self._suspicions[name]
                    m = self.members.rows.get(name)
                    if m is not None and m.state == SUSPECT:
                        self._on_dead(Dead(m.incarnation, name, self.name), now, True)
        if now >= self._next_push_pull and not self.leaving:
            n = self.members.live_count
            self._next_push_pull = now + _pushpull_scale(cfg.push_pull_interval, n)
            peers = self.members.random_members(self.rng, 1, (self.name,))
            if peers:
                self._effects.append(PushPull(peers[0].addr, self._state_payload(join=False), False))
        if now >= self._next_reconnect and not self.leaving:
            # Serf's reconnect: try one member we believe dead, so the two sides
            # of a healed partition find each other again.
            self._next_reconnect = now + cfg.reconnect_interval * (0.5 + self.rng.random())
            dead = self.members.random_dead(self.rng)
            if dead is not None:
                self._effects.append(PushPull(dead.addr, self._state_payload(join=False), False))
        if now >= self._next_reap and not self.leaving:
            self._next_reap = now + cfg.tombstone_ttl / 4
            for name in self.members.reap(now - cfg.tombstone_ttl):
                self._verified.pop(name, None)
                self._sigs.pop(name, None)

    tick = handle_timer

    def _advance(self, now: float) -> None:
        gap = now - self._now
        self._now = now
        if gap > self._min_stall:
            cfg = self.config
            if cfg.lifeguard and gap > self.awareness.scale(cfg.probe_interval) + cfg.probe_interval:
                self._recover_from_stall(now, gap)

    def _recover_from_stall(self, now: float, gap: float) -> None:
        """We were not scheduled for longer than any of our timers allow: we,
        not the others, were slow (Lifeguard §4.1's premise). Acks and
        refutations may be waiting unread, so no probe fails and no suspicion
        expires until we had a probe interval to read them."""
        cfg = self.config
        log.info("gossip.stalled", extra={"member": self.name, "stalled_s": round(gap, 3)})
        self.awareness.apply_delta(1)
        self._probe = None
        self._next_probe = max(self._next_probe, now + cfg.probe_timeout)
        grace = now + cfg.probe_interval
        for s in self._suspicions.values():
            s.postpone(grace)

    def handle_push_pull(self, payload: bytes, now: float) -> bytes:
        """The remote side of a state exchange: merge theirs, answer with ours."""
        state = wire.decode_state(payload)
        self._now = now
        self._merge(state, now)
        return self._state_payload(join=False)

    def stream_exchange_result(self, addr: str, reply: bytes | None, now: float) -> None:
        """Result of a PushPull effect; None when the exchange failed."""
        self._now = now
        if reply is None:
            log.info("gossip.push_pull_failed", extra={"peer": addr})
            return
        state = wire.decode_state(reply)
        self._merge(state, now)
        # Re-phase our own exchanges for the cluster size we now know (a joiner
        # started with an interval scaled for a cluster of one).
        scaled = _pushpull_scale(self.config.push_pull_interval, self.members.live_count)
        if self._joining:
            # One early exchange with a random member picks up whoever joined
            # through other seeds (or the same seed) at the same moment.
            self._joining = False
            self._next_push_pull = now + 1.0 + self.rng.random()
        else:
            self._next_push_pull = max(self._next_push_pull, now + scaled * (0.5 + self.rng.random()))

    def stream_probe_result(self, seq: int, ok: bool, now: float) -> None:
        self._now = now
        self._stream_probes.discard(seq)
        p = self._probe
        if ok and p is not None and p.seq == seq:
            self._probe = None  # reachable over the stream: not suspect (memberlist)

    # ---------------------------------------------------------------- outputs

    def packets_to_send(self) -> list[tuple[str, bytes]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> MembershipEvent | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[MembershipEvent]:
        out = list(self._events)
        self._events.clear()
        return out

    def effects_to_run(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    def next_deadline(self) -> float | None:
        # Called after every input by drivers and the simulator: kept branchy
        # rather than min()-of-lists because it dominates simulation time.
        if self.leaving and not self._queue:
            return None
        d = self._next_probe if not self.leaving else math.inf
        p = self._probe
        if p is not None:
            x = p.end if p.indirect else p.ack_deadline
            if x < d:
                d = x
        if self._queue:
            g = self._next_gossip
            if g < self._now:  # keep the gossip cadence: next beat after now
                g += math.ceil((self._now - g) / self.config.gossip_interval) * self.config.gossip_interval
            if g < d:
                d = g
        if self._relays:
            for r in self._relays.values():
                x = r.nack_at if r.nack_at is not None else r.expires
                if x < d:
                    d = x
        if self._suspicions:
            for s in self._suspicions.values():
                if s.deadline < d:
                    d = s.deadline
        if self._strangers:
            for _, due in self._strangers.values():
                if due < d:
                    d = due
        if self._next_push_pull < d:
            d = self._next_push_pull
        if self._next_reap < d:
            d = self._next_reap
        if self._next_reconnect < d:
            d = self._next_reconnect
        return d

    def member(self, name: str) -> Member | None:
        return self.members.get(name)

    def live_members(self) -> list[Member]:
        return [m for m in self.members.rows.values() if m.state <= SUSPECT]

    # ---------------------------------------------------------------- probing

    def _probe_early(self, name: str, now: float) -> bool:
        """Probe `name` next, as soon as the probe in flight (if any) ends."""
        m = self.members.rows.get(name)
        if m is None or name == self.name or m.state > SUSPECT or self.leaving or name in self._early:
            return False
        asked = self._early_asked
        last = asked.get(name)
        if (last is not None and now - last < self.config.probe_interval) or len(self._early) >= MAX_EARLY_PROBES:
            return False
        if len(asked) > 4 * MAX_EARLY_PROBES:
            for k in [k for k, t in asked.items() if now - t >= self.config.probe_interval]:
                del asked[k]
        p = self._probe
        if p is not None and p.target is m:
            return False  # the probe in flight answers it
        asked[name] = now
        self._early[name] = now
        self._next_probe = min(self._next_probe, p.end if p is not None else now)
        return True

    def _early_target(self) -> Member | None:
        while self._early:
            name = next(iter(self._early))
            del self._early[name]
            m = self.members.rows.get(name)
            if m is not None and m.state <= SUSPECT:
                return m
        return None

    def _start_probe(self, now: float) -> None:
        target = self._early_target() or self.members.next_probe_target(self.rng, self.name)
        if target is None:
            return
        cfg = self.config
        seq = self._next_seq()
        self._probe = _Probe(
            target,
            seq,
            now,
            now + self.awareness.scale(cfg.probe_timeout),
            now + self.awareness.scale(cfg.probe_interval),
        )
        extra: list[bytes] = []
        if target.state == SUSPECT and cfg.lifeguard:
            # Buddy system (Lifeguard §4.3): tell the suspect first, so it can refute.
            extra.append(wire.encode(Suspect(target.incarnation, target.name, self.name)))
        self._send(target.addr, wire.encode(Ping(seq, target.name, self.name, self.addr)), extra)

    def _start_indirect(self, p: _Probe, now: float) -> None:
        cfg = self.config
        p.indirect = True
        t = p.target
        relays = self.members.random_members(self.rng, cfg.indirect_checks, (self.name, t.name))
        nack = cfg.lifeguard
        data = wire.encode(IndirectPing(p.seq, t.name, t.addr, self.name, self.addr, nack))
        for m in relays:
            if m.state != ALIVE:
                continue
            self._send(m.addr, data)
            if nack:
                p.expected_nacks += 1
        if cfg.stream_fallback:
            self._stream_probes.add(p.seq)
            self._effects.append(StreamProbe(t.addr, t.name, p.seq))

    def _probe_failed(self, p: _Probe, now: float) -> None:
        self._probe = None
        # Lifeguard §4.1: missing nacks mean we, not the target, may be the problem.
        if p.expected_nacks > 0:
            if p.nacks < p.expected_nacks:
                self.awareness.apply_delta(p.expected_nacks - p.nacks)
        else:
            self.awareness.apply_delta(1)
        t = self.members.rows.get(p.target.name)
        if t is None or t is not p.target or t.state > SUSPECT:
            return
        self._on_suspect(Suspect(t.incarnation, t.name, self.name), now, True)

    def _on_ping(self, msg: Ping, from_addr: str) -> None:
        if msg.target != self.name:
            return  # meant for a previous owner of this address
        self._send(from_addr, wire.encode(Ack(msg.seq)))
        if msg.source not in self.members.rows and len(self._strangers) < 64:
            self._strangers.setdefault(msg.source, (msg.source_addr, self._now + STRANGER_GRACE))

    def _check_strangers(self, now: float) -> None:
        for name, (addr, due) in list(self._strangers.items()):
            if name in self.members.rows:
                del self._strangers[name]
            elif now >= due:
                del self._strangers[name]
                self._effects.append(PushPull(addr, self._state_payload(join=False), False))

    def _on_indirect_ping(self, msg: IndirectPing, now: float) -> None:
        cfg = self.config
        seq = self._next_seq()
        nack_at = now + cfg.probe_timeout * 0.8 if msg.nack else None
        self._relays[seq] = _Relay(msg.source_addr, msg.seq, nack_at, now + cfg.probe_interval)
        self._send(msg.target_addr, wire.encode(Ping(seq, msg.target, self.name, self.addr)))

    def _on_ack(self, msg: Ack, now: float) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq:
            self._probe = None
            self.awareness.apply_delta(-1)
            return
        r = self._relays.pop(msg.seq, None)
        if r is not None:
            self._send(r.source_addr, wire.encode(Ack(r.seq)))

    def _expire_relays(self, now: float) -> None:
        for seq, r in list(self._relays.items()):
            if r.nack_at is not None and now >= r.nack_at:
                r.nack_at = None
                self._send(r.source_addr, wire.encode(Nack(r.seq)))
            if now >= r.expires:
                del self._relays[seq]

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    # ---------------------------------------------------- state changes (SWIM §4.2)

    def _on_alive(self, a: Alive, now: float, gossip: bool) -> None:
        rows = self.members.rows
        m = rows.get(a.node)
        if a.node == self.name:
            if a.incarnation > self.incarnation and not self.leaving:
                self._refute(a.incarnation)
            return
        if m is not None and a.incarnation < m.incarnation and a.node in self._verified:
            return  # stale: no need to check its signature
        verified = False
        claims = self.claims
        if claims is not None:
            verdict = claims.verify(a.node, a.incarnation, CLAIM_ALIVE, a.meta_version, a.addr, a.meta, a.sig)
            if verdict is False:
                self.stats["claims_rejected"] += 1
                return
            verified = verdict is True
        if not verified and a.incarnation > (m.incarnation if m is not None else 0) + INCARNATION_WINDOW:
            self.stats["claims_rejected"] += 1
            return
        if verified and m is not None and a.node not in self._verified and a.incarnation <= m.incarnation:
            # The member's first signed word outranks whatever unsigned gossip
            # said of it before its key was known here.
            m.incarnation = a.incarnation - 1
        if m is None:
            m = Member(a.node, a.addr, a.incarnation, ALIVE, now, a.meta_version, a.meta)
            self.members.add(m, self.rng)
            self._events.append(MemberJoined(m.name, m.addr, m.meta))
        elif a.incarnation > m.incarnation:
            old_state = m.state
            changed = m.addr != a.addr or m.meta_version != a.meta_version or m.meta != a.meta
            m.incarnation = a.incarnation
            m.addr = a.addr
            m.meta_version = a.meta_version
            m.meta = a.meta
            if old_state != ALIVE:
                self.members.set_state(m, ALIVE, now)
            self._suspicions.pop(m.name, None)
            if old_state >= DEAD:
                self._events.append(MemberJoined(m.name, m.addr, m.meta))
            elif old_state == SUSPECT:
                self._events.append(MemberAlive(m.name, m.incarnation))
                if changed:
                    self._events.append(MemberUpdated(m.name, m.addr, m.meta))
            elif changed:
                self._events.append(MemberUpdated(m.name, m.addr, m.meta))
        elif a.incarnation == m.incarnation and m.state == ALIVE and a.meta_version > m.meta_version:
            m.meta_version = a.meta_version
            m.meta = a.meta
            self._events.append(MemberUpdated(m.name, m.addr, m.meta))
        else:
            return
        if verified:
            self._verified[a.node] = a.incarnation
            self._sigs[a.node] = a.sig
        elif self._sigs:
            self._sigs.pop(a.node, None)  # no longer the signature of what we hold
        if gossip:
            self._queue_broadcast(a.node, wire.encode(a))

    def _on_suspect(self, s: Suspect, now: float, gossip: bool) -> None:
        m = self.members.rows.get(s.node)
        if m is None or s.incarnation < m.incarnation or m.state >= DEAD:
            return
        if s.node == self.name:
            if not self.leaving:
                self._refute(s.incarnation)
            return
        incarnation = self._observed_incarnation(m, s.incarnation)
        if incarnation is None:
            return
        if incarnation != s.incarnation:
            s = Suspect(incarnation, s.node, s.source)
        if m.state == SUSPECT:
            susp = self._suspicions.get(s.node)
            if susp is not None and susp.confirm(s.source) and gossip:
                # Re-gossip new confirmations so others shrink their timers too.
                self._queue_broadcast(s.node, wire.encode(s))
            return
        cfg = self.config
        m.incarnation = s.incarnation
        self.members.set_state(m, SUSPECT, now)
        self.stats["suspected"] += 1
        n = self.members.live_count
        low, high = suspicion_bounds(
            n, cfg.probe_interval, cfg.suspicion_mult, cfg.suspicion_max_mult, cfg.suspicion_floor
        )
        if cfg.lifeguard:
            # Confirmations can come only from members other than the suspect and us.
            expected = min(cfg.expected_confirmations, max(0, n - 2))
        else:
            expected, high = 0, low
        self._suspicions[s.node] = Suspicion(s.incarnation, s.source, now, low, high, expected)
        self._events.append(MemberSuspect(m.name, s.incarnation, s.source))
        if gossip:
            self._queue_broadcast(s.node, wire.encode(s))
        if expected > 0 and cfg.early_confirmations and s.source != self.name:
            # Confirmations shrink the timeout only if they come soon; waiting
            # for the suspect's turn in each member's round-robin order takes
            # up to n probe intervals. About 2 x expected members (all of them
            # in a small cluster) probe it now instead: independent evidence,
            # sooner, and the buddy system tells a live suspect sooner too.
            if 2 * expected >= n - 2 or self.rng.random() * (n - 2) < 2 * expected:
                self._probe_early(s.node, now)

    def _on_dead(self, d: Dead, now: float, gossip: bool) -> None:
        m = self.members.rows.get(d.node)
        if m is None or m.state >= DEAD:
            return
        if d.node == self.name:
            if d.incarnation >= m.incarnation and not self.leaving:
                self._refute(d.incarnation)
            return
        verified = False
        if d.source == d.node:
            # A leave is the member's own claim: only its signature makes it.
            claims = self.claims
            verdict = None
            if claims is not None:
                verdict = claims.verify(d.node, d.incarnation, CLAIM_LEFT, 0, "", None, d.sig)
                if verdict is False:
                    self.stats["claims_rejected"] += 1
                    return
            verified = verdict is True
            if verified and d.node not in self._verified and d.incarnation <= m.incarnation:
                m.incarnation = d.incarnation  # as in _on_alive: signed beats unsigned
            if d.incarnation < m.incarnation:
                return
            if not verified and d.incarnation > m.incarnation + INCARNATION_WINDOW:
                self.stats["claims_rejected"] += 1
                return
        else:
            if d.incarnation < m.incarnation:
                return
            incarnation = self._observed_incarnation(m, d.incarnation)
            if incarnation is None:
                return
            if incarnation != d.incarnation:
                d = Dead(incarnation, d.node, d.source)
        if verified:
            self._verified[d.node] = d.incarnation
            self._sigs[d.node] = d.sig
        m.incarnation = d.incarnation
        self._suspicions.pop(d.node, None)
        if d.source == d.node:
            self.members.set_state(m, LEFT, now)
            self._events.append(MemberLeft(m.name))
        else:
            self.members.set_state(m, DEAD, now)
            self._events.append(MemberDead(m.name, d.incarnation, d.source))
        if gossip:
            self._queue_broadcast(d.node, wire.encode(d))

    def _observed_incarnation(self, m: Member, incarnation: int) -> int | None:
        """The incarnation an unsigned suspect/dead observation about `m` is
        taken to speak of, or None to drop it. Only a member moves its own
        incarnation: once it has signed one, an observation naming a higher
        one is about the signed one (the member refutes it as usual); for an
        unsigned member, a jump past the window is dropped."""
        if incarnation <= m.incarnation:
            return incarnation
        if m.name in self._verified or (self.claims is not None and self.claims.knows(m.name)):
            self.stats["observations_clamped"] += 1
            return m.incarnation
        if incarnation > m.incarnation + INCARNATION_WINDOW:
            self.stats["claims_rejected"] += 1
            return None
        return incarnation

    def _refute(self, accused_incarnation: int) -> None:
        """Someone thinks we are suspect or dead: outbid them (SWIM §4.2).

        An accusation moves us at most INCARNATION_WINDOW ahead: honest ones
        name at most what we signed before (a restart forgets it), and a
        forged one at the maximum must not leave us nothing to refute with."""
        accused = min(accused_incarnation, self.incarnation + INCARNATION_WINDOW)
        self.incarnation = min(max(self.incarnation, accused) + 1, wire.MAX_INCARNATION)
        me = self.members.rows[self.name]
        me.incarnation = self.incarnation
        self.stats["refutations"] += 1
        self.awareness.apply_delta(1)  # Lifeguard §4.1: being accused is a health signal
        self._encode_self()
        self._queue_broadcast(self.name, self._self_alive)

    def _encode_self(self) -> None:
        # Signed here, once per change of incarnation or metadata, not per packet.
        if self.claims is not None:
            self._self_sig = self._sigs[self.name] = self.claims.sign(
                self.name, self.incarnation, CLAIM_ALIVE, self.meta_version, self.addr, self.meta
            )
        self._self_alive = wire.encode(
            Alive(self.incarnation, self.name, self.addr, self.meta_version, self.meta, self._self_sig)
        )

    # ------------------------------------------------------------- push-pull

    def _state_payload(self, join: bool) -> bytes:
        sigs = self._sigs
        rows = [
            wire.MemberRecord(m.name, m.addr, m.incarnation, m.state, m.meta_version, m.meta, sigs.get(m.name, b""))
            for m in self.members.rows.values()
        ]
        return wire.encode(wire.PushPullState(join, self.name, rows))

    def _merge(self, state: wire.PushPullState, now: float) -> None:
        # Second-hand rows are merged quietly; only the sender's own row (a
        # joiner announcing itself) is gossiped on, so a join spreads at once.
        sender = state.sender
        for r in state.members:
            first_hand = r.node == sender
            if r.state == ALIVE:
                self._on_alive(Alive(r.incarnation, r.node, r.addr, r.meta_version, r.meta, r.sig), now, first_hand)
            elif r.state == LEFT:
                self._on_dead(Dead(r.incarnation, r.node, r.node, r.sig), now, first_hand)
            else:
                # memberlist mergeState: a remote "dead" is only a suspicion here,
                # gossiped so that the member can refute it.
                self._on_suspect(Suspect(r.incarnation, r.node, sender), now, True)

    # ---------------------------------------------------------- dissemination

    def _queue_broadcast(self, key: str, data: bytes) -> None:
        self._order += 1
        self._queue[key] = _Broadcast(data, self._order)
        if len(self._queue) > self.config.max_queue_depth:
            worst = max(self._queue.items(), key=lambda kv: (kv[1].transmits, -kv[1].order))
            del self._queue[worst[0]]

    def _retransmit_limit(self) -> int:
        n = self.members.live_count
        return self.config.retransmit_mult * math.ceil(math.log10(n + 1))

    def _take_broadcasts(self, budget: int) -> list[bytes]:
        """Fewest-sent first, newest first among equals (memberlist's queue)."""
        q = self._queue
        if not q:
            return []
        limit = self._retransmit_limit()
        picked: list[bytes] = []
        items = sorted(q.items(), key=lambda kv: (kv[1].transmits, -kv[1].order))
        for key, b in items:
            size = len(b.data)
            if size > budget:
                continue
            budget -= size
            picked.append(b.data)
            b.transmits += 1
            if b.transmits >= limit:
                del q[key]
            if budget < 24:
                break
        return picked

    def _gossip(self, now: float) -> None:
        cfg = self.config
        targets = self.members.random_members(
            self.rng, cfg.gossip_nodes, (self.name,), dead_since=now - cfg.gossip_to_the_dead
        )
        for m in targets:
            pig = self._take_broadcasts(cfg.max_payload - wire.ARRAY_HEADER_MAX)
            if not pig:
                break
            self._emit(m.addr, wire.pack(pig))

    def _send(self, addr: str, first: bytes, extra: list[bytes] | None = None) -> None:
        used = len(first) + wire.ARRAY_HEADER_MAX
        parts = [first]
        if extra:
            parts.extend(extra)
            used += sum(len(e) for e in extra)
        parts.extend(self._take_broadcasts(self.config.max_payload - used))
        self._emit(addr, wire.pack(parts))

    def _emit(self, addr: str, packet: bytes) -> None:
        self.stats["packets_out"] += 1
        self.stats["bytes_out"] += len(packet)
        self._out.append((addr, packet))
