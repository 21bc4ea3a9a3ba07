"""In-memory twin of a carrier, for unit tests and simulations.

`MemoryCarrier` hands out the same `MuxSession` connections as TLS/TCP, but
riding an in-process byte pipe instead of a socket and with no crypto: the
identity a carrier is built with is what its peers see as `peer`. Stream
semantics, flow control, resets and keepalive are therefore exactly those
of the real TLS carrier.

Faults are injected through the `MemoryNetwork`:

    network.partition(a, b)   bytes between a and b stop flowing (held, as
                              TCP would retransmit); keepalive then declares
                              the peer gone unless `heal` comes first
    network.heal()            undo every partition (held bytes flow again)
    network.disconnect(a, b)  break the existing connections now (like RST)
    network.refuse(a)         new connections to or from a fail

A connect to an address nobody serves, or across a partition, fails at once
with ConnectionLost (the twin does not simulate a SYN timeout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from cloudless.transport.base import Connection, ConnectionHandler, ConnectionLost, PeerIdentity
from cloudless.transport.mux import MuxConfig, MuxSession, run_session

log = logging.getLogger(__name__)

Address = tuple[str, int]

# Like a socket buffer: a writer blocks once this much is in flight.
PIPE_CAPACITY = 256 * 1024


class _Direction:
    """One direction of a pipe: a bounded byte buffer that can be held or broken."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.held = False
        self.closed = False  # writer closed (EOF after the buffer drains)
        self.broken = False  # connection broken: both ends error
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class PipeEnd:
    """One end of an in-memory byte pipe; a `mux.ByteTransport`."""

    def __init__(self, outgoing: _Direction, incoming: _Direction) -> None:
        self._out = outgoing
        self._in = incoming

    async def send_all(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        while view:
            if self._out.broken or self._out.closed:
                raise trio.BrokenResourceError("memory pipe broken")
            room = self._out.capacity - len(self._out.buffer)
            if room <= 0:
                await self._out.changed.wait()
                continue
            n = min(room, len(view))
            self._out.buffer += view[:n]
            view = view[n:]
            self._out.notify()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            if self._in.broken:
                raise trio.BrokenResourceError("memory pipe broken")
            if self._in.buffer and not self._in.held:
                n = len(self._in.buffer) if max_bytes is None else min(max_bytes, len(self._in.buffer))
                data = bytes(self._in.buffer[:n])
                del self._in.buffer[:n]
                self._in.notify()
                await trio.lowlevel.checkpoint()
                return data
            if self._in.closed and not self._in.buffer:
                await trio.lowlevel.checkpoint()
                return b""
            await self._in.changed.wait()

    async def aclose(self) -> None:
        self._out.closed = True
        self._out.notify()
        self._in.broken = True
        self._in.notify()
        await trio.lowlevel.checkpoint()


def memory_pipe(capacity: int = PIPE_CAPACITY) -> tuple[PipeEnd, PipeEnd, tuple[_Direction, _Direction]]:
    a_to_b, b_to_a = _Direction(capacity), _Direction(capacity)
    return PipeEnd(a_to_b, b_to_a), PipeEnd(b_to_a, a_to_b), (a_to_b, b_to_a)


@dataclass(eq=False)
class _Link:
    a: Address
    b: Address
    directions: tuple[_Direction, _Direction]

    def joins(self, x: Address, y: Address | None) -> bool:
        if y is None:
            return x in (self.a, self.b)
        return {self.a, self.b} == {x, y}


@dataclass
class _Listener:
    carrier: MemoryCarrier
    incoming: trio.MemorySendChannel = field(repr=False)


class MemoryNetwork:
    """The in-process 'internet' memory carriers listen and connect on."""

    def __init__(self, *, mux_config: MuxConfig | None = None) -> None:
        self.mux_config = mux_config or MuxConfig()
        self._listeners: dict[Address, _Listener] = {}
        self._links: list[_Link] = []
        self._partitions: set[frozenset[Address]] = set()
        self._refused: set[Address] = set()

    def _partitioned(self, a: Address, b: Address) -> bool:
        return frozenset((a, b)) in self._partitions

    def partition(self, a: Address, b: Address) -> None:
        self._partitions.add(frozenset((a, b)))
        for link in self._links:
            if link.joins(a, b):
                for direction in link.directions:
                    direction.held = True
                    direction.notify()

    def heal(self) -> None:
        self._partitions.clear()
        for link in self._links:
            for direction in link.directions:
                direction.held = False
                direction.notify()

    def disconnect(self, a: Address, b: Address | None = None) -> None:
        for link in [link for link in self._links if link.joins(a, b)]:
            for direction in link.directions:
                direction.broken = True
                direction.notify()
            self._links.remove(link)

    def refuse(self, address: Address, refused: bool = True) -> None:
        if refused:
            self._refused.add(address)
        else:
            self._refused.discard(address)

    def statistics(self) -> dict[str, int]:
        return {"listeners": len(self._listeners), "links": len(self._links), "partitions": len(self._partitions)}


class MemoryCarrier:
    """A carrier on a MemoryNetwork; `identity` is what peers see as `peer`."""

    def __init__(
        self,
        network: MemoryNetwork,
        identity: PeerIdentity,
        address: Address,
        *,
        mux_config: MuxConfig | None = None,
    ) -> None:
        self.network = network
        self.identity = identity
        self.address = address
        self.mux_config = mux_config or network.mux_config

    async def connect(self, address: Address) -> Connection:
        await trio.lowlevel.checkpoint()
        address = (address[0], int(address[1]))
        network = self.network
        listener = network._listeners.get(address)
        if listener is None:
            raise ConnectionLost(f"connection refused: nothing serves {address}", address=address)
        if address in network._refused or self.address in network._refused:
            raise ConnectionLost(f"connection to {address} refused", address=address)
        if network._partitioned(self.address, address):
            raise ConnectionLost(f"{address} is unreachable (partitioned)", address=address)
        ours, theirs, directions = memory_pipe()
        network._links = [link for link in network._links if not all(d.broken or d.closed for d in link.directions)]
        network._links.append(_Link(self.address, address, directions))
        client = MuxSession(
            ours, is_client=True, peer=listener.carrier.identity, remote_address=address, config=self.mux_config
        )
        server = MuxSession(
            theirs, is_client=False, peer=self.identity, remote_address=self.address, config=listener.carrier.mux_config
        )
        try:
            listener.incoming.send_nowait(server)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionLost(f"{address} is not accepting connections", address=address) from None
        await client.start_detached()
        return client

    async def serve(self, handler: ConnectionHandler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.address in self.network._listeners:
            raise OSError(f"address {self.address} already in use")
        send, receive = trio.open_memory_channel[MuxSession](128)
        self.network._listeners[self.address] = _Listener(self, send)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                async with receive:
                    async for session in receive:
                        nursery.start_soon(run_session, session, handler)
        finally:
            del self.network._listeners[self.address]
            send.close()
