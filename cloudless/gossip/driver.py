"""The trio driver: runs a `GossipCore` on the node's UDP socket.

It makes no protocol decisions. One loop feeds the core what arrives
(datagrams, stream results) or its timer when the deadline passes, then
performs what the core asks for: seal and send packets, run stream effects
(push-pull, fallback probes) in child tasks under a deadline, hand events to
listeners.

The datagram side fits `cloudless.transport.udp.UdpEndpoint` (or anything
with `set_datagram_handler(fn)` and `send_nowait(data, addr)`); streams go
through an injected `stream_exchange(addr, request) -> reply` that the node
wires to its RPC layer; the other end answers with `serve_stream(request)`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

import trio

from cloudless.errors import CloudlessError
from cloudless.gossip.core import GossipCore
from cloudless.gossip.events import MembershipEvent, PushPull, StreamProbe
from cloudless.gossip.keyring import PacketSealer, UnsealError
from cloudless.gossip.messages import MalformedPacket
from cloudless.gossip.metadata import Metadata

log = logging.getLogger(__name__)

StreamExchange = Callable[[str, bytes], Awaitable[bytes]]
EventListener = Callable[[MembershipEvent], None]

# Stream requests: one kind byte, then the body.
STREAM_PUSH_PULL = b"P"
STREAM_PROBE = b"I"
STREAM_PROBE_ACK = b"A"
INBOX_SIZE = 1024

# What the loop receives: a datagram, a stream result, or a call on the core.
InboxItem = (
    tuple[Literal["packet"], bytes, tuple[str, int]]
    | tuple[Literal["probe"], int, bool]
    | tuple[Literal["exchange"], str, bytes | None]
    | tuple[Literal["call"], Callable[[float], object]]
)


class DatagramEndpoint(Protocol):
    def set_datagram_handler(self, handler: Callable[[bytes, tuple[str, int]], None] | None) -> None: ...

    def send_nowait(self, data: bytes, addr: tuple[str, int]) -> bool: ...


class StreamRequestInvalid(CloudlessError):
    """A gossip stream request had an unknown kind byte."""


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def format_addr(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GossipDriver:
    def __init__(
        self,
        core: GossipCore,
        endpoint: DatagramEndpoint,
        sealer: PacketSealer,
        stream_exchange: StreamExchange,
        *,
        stream_timeout: float = 5.0,
    ) -> None:
        self.core = core
        self.endpoint = endpoint
        self.sealer = sealer
        self.stream_exchange = stream_exchange
        self.stream_timeout = stream_timeout
        self._send_inbox, self._inbox = trio.open_memory_channel[InboxItem](INBOX_SIZE)
        self._listeners: list[EventListener] = []
        self._nursery: trio.Nursery | None = None
        self._leaving = False
        self._leave_announced = trio.Event()
        self.counters = {"inbox_full": 0, "malformed": 0, "unsealed_dropped": 0, "send_blocked": 0}

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    # Called synchronously from the UDP receive loop: never block, drop when full.
    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._send_inbox.send_nowait(("packet", data, addr))
        except trio.WouldBlock:
            self.counters["inbox_full"] += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.endpoint.set_datagram_handler(self._on_datagram)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._loop()
        finally:
            self.endpoint.set_datagram_handler(None)
            self._nursery = None

    async def _loop(self) -> None:
        core = self.core
        while True:
            deadline = core.next_deadline()
            item: InboxItem | None = None
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                item = await self._inbox.receive()
            now = trio.current_time()
            if item is not None:
                self._handle(item, now)
            if deadline is not None and now >= deadline:
                core.handle_timer(now)
            await self._flush()

    def _handle(self, item: InboxItem, now: float) -> None:
        match item:
            case ("packet", data, addr):
                try:
                    payload = self.sealer.open(data)
                    self.core.receive(payload, format_addr(addr), now)
                except UnsealError as exc:
                    self.counters["unsealed_dropped"] += 1
                    log.debug("gossip.packet_dropped", extra={"peer": addr, "reason": exc.reason})
                except MalformedPacket as exc:
                    self.counters["malformed"] += 1
                    log.warning("gossip.packet_malformed", extra={"peer": addr, "error": exc.message})
            case ("probe", seq, ok):
                self.core.stream_probe_result(seq, ok, now)
            case ("exchange", peer, reply):
                try:
                    self.core.stream_exchange_result(peer, reply, now)
                except MalformedPacket as exc:
                    self.counters["malformed"] += 1
                    log.warning("gossip.state_malformed", extra={"peer": peer, "error": exc.message})
            case ("call", call):
                call(now)

    async def _flush(self) -> None:
        core = self.core
        for addr, payload in core.packets_to_send():
            if not self.endpoint.send_nowait(self.sealer.seal(payload), parse_addr(addr)):
                self.counters["send_blocked"] += 1  # like loss on the wire; SWIM copes
        nursery = self._nursery
        for effect in core.effects_to_run():
            assert nursery is not None
            if type(effect) is StreamProbe:
                nursery.start_soon(self._stream_probe, effect)
            elif type(effect) is PushPull:
                nursery.start_soon(self._push_pull, effect)
        event = core.next_event()
        while event is not None:
            for listener in self._listeners:
                listener(event)
            event = core.next_event()
        # The core's leave state changes only in the calls this loop makes, each followed by a flush.
        if self._leaving and core.leave_announced:
            self._leave_announced.set()
        await trio.lowlevel.checkpoint()

    async def _stream_probe(self, effect: StreamProbe) -> None:
        ok = False
        with trio.move_on_after(self.stream_timeout):
            try:
                reply = await self.stream_exchange(effect.addr, STREAM_PROBE + effect.target.encode())
                ok = reply == STREAM_PROBE_ACK
            except (CloudlessError, OSError) as exc:
                log.debug("gossip.stream_probe_failed", extra={"peer": effect.addr, "error": repr(exc)})
        await self._send_inbox.send(("probe", effect.seq, ok))

    async def _push_pull(self, effect: PushPull) -> None:
        reply = None
        with trio.move_on_after(self.stream_timeout):
            try:
                reply = await self.stream_exchange(effect.addr, STREAM_PUSH_PULL + effect.payload)
            except (CloudlessError, OSError) as exc:
                log.info("gossip.push_pull_failed", extra={"peer": effect.addr, "error": repr(exc)})
        await self._send_inbox.send(("exchange", effect.addr, reply))

    # ----------------------------------------------------------- public calls

    async def serve_stream(self, request: bytes) -> bytes:
        """Answer a peer's stream request (the RPC layer calls this)."""
        kind, body = request[:1], request[1:]
        if kind == STREAM_PROBE:
            return STREAM_PROBE_ACK if body.decode(errors="replace") == self.core.name else b"N"
        if kind == STREAM_PUSH_PULL:
            reply = self.core.handle_push_pull(body, trio.current_time())
            await self._wake()
            return reply
        raise StreamRequestInvalid("unknown gossip stream request", kind=kind.hex())

    async def _wake(self) -> None:
        # Make the loop flush what a direct core call produced.
        await self._send_inbox.send(("call", lambda now: None))

    async def join(self, seeds: list[str]) -> None:
        await self._send_inbox.send(("call", lambda now: self.core.join(seeds, now)))

    async def update_metadata(self, meta: Metadata) -> None:
        await self._send_inbox.send(("call", lambda now: self.core.update_metadata(meta, now)))

    def hint_unreachable(self, name: str) -> None:
        """A connection to member `name` failed: have the core probe it out of
        turn (`GossipCore.hint_unreachable`). Never blocks; dropped when the
        inbox is full, like any hint."""
        try:
            self._send_inbox.send_nowait(("call", lambda now: self.core.hint_unreachable(name, now)))
        except trio.WouldBlock:
            self.counters["inbox_full"] += 1

    def _start_leave(self, now: float) -> None:
        self._leaving = True
        self.core.leave(now)

    async def wait_leave_announced(self) -> None:
        """Return once a leave asked for with `leave()` went out (`GossipCore.leave_announced`)."""
        await self._leave_announced.wait()

    async def leave(self, timeout: float = 2.0) -> bool:
        """Announce a graceful leave and wait (at most `timeout`) until it went out."""
        await self._send_inbox.send(("call", self._start_leave))
        with trio.move_on_after(timeout):
            await self.wait_leave_announced()
            return True
        return False


class MemoryDatagramNetwork:
    """In-memory twin of the node's UDP socket for driver tests: endpoints
    deliver to each other's datagram handlers at once, optionally dropping a
    seeded fraction, and a cut endpoint neither sends nor receives."""

    def __init__(self, loss: float = 0.0, seed: int = 0) -> None:
        self.loss = loss
        self._rng = random.Random(seed)
        self._endpoints: dict[tuple[str, int], MemoryDatagramEndpoint] = {}

    def endpoint(self) -> MemoryDatagramEndpoint:
        ep = MemoryDatagramEndpoint(self, ("10.0.0.1", 7000 + len(self._endpoints)))
        self._endpoints[ep.local_address] = ep
        return ep

    def _deliver(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        ep = self._endpoints.get(dst)
        if ep is None or ep.cut or ep._handler is None:
            return
        if self.loss and self._rng.random() < self.loss:
            return
        ep._handler(data, src)


class MemoryDatagramEndpoint:
    def __init__(self, network: MemoryDatagramNetwork, address: tuple[str, int]) -> None:
        self.network = network
        self.local_address = address
        self.cut = False
        self._handler: Callable[[bytes, tuple[str, int]], None] | None = None

    def set_datagram_handler(self, handler: Callable[[bytes, tuple[str, int]], None] | None) -> None:
        self._handler = handler

    def send_nowait(self, data: bytes, addr: tuple[str, int]) -> bool:
        if not self.cut:
            self.network._deliver(data, self.local_address, addr)
        return True
