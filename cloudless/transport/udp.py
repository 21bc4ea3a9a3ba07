"""The node's one UDP socket, shared by QUIC and gossip.

Demultiplexing follows RFC 9443 §5: every QUIC v1 packet has the fixed bit
(0x40) set in its first byte (RFC 9000 §17.2, §17.3), so a datagram whose first
byte has 0x40 clear cannot be QUIC. Gossip packets start with a byte below
0x40 and reach the datagram handler; everything else reaches the QUIC handler.

Handlers are plain callables `handler(data: bytes, addr: (host, port))`,
called synchronously from the receive loop, so they must not block: the QUIC
carrier feeds the datagram straight into its sans-IO connection and wakes the
connection's task; gossip is expected to push into its own channel (and drop
when it is full). A handler that raises is logged and counted; one bad packet
never stops the socket. Datagrams no handler wants are dropped and counted.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import trio

from cloudless.transport.base import TransportError

log = logging.getLogger(__name__)

DatagramHandler = Callable[[bytes, tuple[str, int]], None]

QUIC_FIXED_BIT = 0x40
MAX_DATAGRAM = 65_535
# Large kernel buffers so a burst of QUIC packets is queued, not dropped.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
# Datagrams handled per readiness wake-up before yielding to other tasks.
RECEIVE_BATCH = 64
SEND_TIMEOUT = 5.0
_TRANSIENT_ERRORS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH)


@dataclass(frozen=True, slots=True)
class UdpEndpointStatistics:
    datagrams_received: int
    bytes_received: int
    quic_datagrams: int
    other_datagrams: int
    unhandled_quic: int
    unhandled_other: int
    empty_datagrams: int
    handler_errors: int
    datagrams_sent: int
    bytes_sent: int
    send_errors: int


def is_quic_datagram(data: bytes) -> bool:
    return bool(data) and bool(data[0] & QUIC_FIXED_BIT)


class UdpEndpoint:
    """One bound UDP socket and its receive loop; start with `await nursery.start(endpoint.run)`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._bind = (host, port)
        self._socket: socket.socket | None = None
        self._quic_handler: DatagramHandler | None = None
        self._datagram_handler: DatagramHandler | None = None
        self._bound = trio.Event()
        self._closed = False
        self._counts = dict.fromkeys(UdpEndpointStatistics.__slots__, 0)

    @property
    def local_address(self) -> tuple[str, int]:
        if self._socket is None:
            raise TransportError("UDP endpoint is not bound yet", bind=self._bind)
        host, port = self._socket.getsockname()[:2]
        return host, port

    @property
    def is_bound(self) -> bool:
        return self._socket is not None and not self._closed

    async def wait_bound(self) -> tuple[str, int]:
        await self._bound.wait()
        return self.local_address

    def set_quic_handler(self, handler: DatagramHandler | None) -> None:
        self._quic_handler = handler

    def set_datagram_handler(self, handler: DatagramHandler | None) -> None:
        """Receive every non-QUIC datagram (first byte < 0x40): gossip registers here."""
        self._datagram_handler = handler

    def statistics(self) -> UdpEndpointStatistics:
        return UdpEndpointStatistics(**self._counts)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host, port = self._bind
        # A plain non-blocking socket rather than trio.socket: one readiness wait then
        # drains a batch of datagrams, so a burst costs one scheduler round, not one per packet.
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
                except OSError:  # capped by the kernel; the default still works
                    pass
            sock.bind((host, port))
            self._socket = sock
            self._bound.set()
            log.info("udp.bound", extra={"address": self.local_address})
            task_status.started(self.local_address)
            await self._receive_loop(sock)
        finally:
            self._closed = True
            sock.close()

    async def _receive_loop(self, sock: socket.socket) -> None:
        counts = self._counts
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(RECEIVE_BATCH):
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:
                    # ICMP errors surface here on some platforms; the socket stays usable.
                    if exc.errno in _TRANSIENT_ERRORS:
                        continue
                    raise
                counts["datagrams_received"] += 1
                counts["bytes_received"] += len(data)
                if not data:
                    counts["empty_datagrams"] += 1
                    continue
                addr = (addr[0], addr[1])
                if data[0] & QUIC_FIXED_BIT:
                    counts["quic_datagrams"] += 1
                    handler = self._quic_handler
                    unhandled = "unhandled_quic"
                else:
                    counts["other_datagrams"] += 1
                    handler = self._datagram_handler
                    unhandled = "unhandled_other"
                if handler is None:
                    counts[unhandled] += 1
                    continue
                try:
                    handler(data, addr)
                except Exception:
                    counts["handler_errors"] += 1
                    log.exception("udp.handler_failed", extra={"peer": addr, "size": len(data)})

    def send_nowait(self, data: bytes, addr: tuple[str, int]) -> bool:
        """Send one datagram if the socket buffer has room; False means wait and retry.

        UDP is lossy, so a send that fails for any other reason is counted and dropped.
        """
        sock = self._socket
        if sock is None:
            raise TransportError("UDP endpoint is not bound yet", bind=self._bind)
        if self._closed:  # like a datagram lost on the wire: callers already cope with that
            self._counts["send_errors"] += 1
            return True
        try:
            sock.sendto(data, addr)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._counts["send_errors"] += 1
            log.debug("udp.send_failed", extra={"peer": addr, "error": repr(exc)})
            return True
        self._counts["datagrams_sent"] += 1
        self._counts["bytes_sent"] += len(data)
        return True

    async def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send one datagram, waiting (at most SEND_TIMEOUT) for socket buffer space."""
        while not self.send_nowait(data, addr):
            assert self._socket is not None
            with trio.move_on_after(SEND_TIMEOUT) as scope:
                await trio.lowlevel.wait_writable(self._socket)
            if scope.cancelled_caught:
                self._counts["send_errors"] += 1
                log.warning("udp.send_stalled", extra={"peer": addr, "timeout_s": SEND_TIMEOUT})
                return
        await trio.lowlevel.checkpoint()


__all__ = ["QUIC_FIXED_BIT", "DatagramHandler", "UdpEndpoint", "UdpEndpointStatistics", "is_quic_datagram"]
