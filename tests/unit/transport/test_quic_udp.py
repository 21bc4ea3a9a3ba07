"""The shared UDP endpoint: QUIC/gossip demultiplexing by the fixed bit (RFC 9443 §5, RFC 9000 §17)."""

from __future__ import annotations

import socket

import pytest
import trio

from cloudless.transport.udp import UdpEndpoint, is_quic_datagram
from tests.harness import waiting


def test_fixed_bit_decides_quic_rfc9000_17():
    assert is_quic_datagram(bytes([0xC0]) + b"long header")  # Initial etc.
    assert is_quic_datagram(bytes([0x40]) + b"short header")
    assert not is_quic_datagram(bytes([0x01]) + b"gossip")
    assert not is_quic_datagram(bytes([0x3F]))
    assert not is_quic_datagram(bytes([0x80]))  # long-header bit alone is not QUIC v1
    assert not is_quic_datagram(b"")


async def wait_until(predicate, timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        await waiting.wait_until(predicate, interval=0.005)


async def test_endpoint_routes_by_first_byte_and_counts(nursery):
    endpoint = UdpEndpoint("127.0.0.1", 0)
    address = await nursery.start(endpoint.run)
    quic, gossip = [], []
    endpoint.set_quic_handler(lambda data, addr: quic.append((data, addr)))
    endpoint.set_datagram_handler(lambda data, addr: gossip.append((data, addr)))

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.bind(("127.0.0.1", 0))
        sender.sendto(b"\x01gossip-ping", address)
        sender.sendto(b"\xc3quic-initial", address)
        sender.sendto(b"\x5fquic-short", address)
        sender.sendto(b"", address)
        await wait_until(lambda: endpoint.statistics().datagrams_received == 4)
        sender_address = sender.getsockname()

    assert gossip == [(b"\x01gossip-ping", sender_address)]
    assert [d for d, _ in quic] == [b"\xc3quic-initial", b"\x5fquic-short"]
    stats = endpoint.statistics()
    assert (stats.quic_datagrams, stats.other_datagrams, stats.empty_datagrams) == (2, 1, 1)


async def test_unhandled_datagrams_are_dropped_and_counted(nursery):
    endpoint = UdpEndpoint()
    address = await nursery.start(endpoint.run)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"\x02no gossip handler", address)
        sender.sendto(b"\x41no quic handler", address)
        await wait_until(lambda: endpoint.statistics().datagrams_received == 2)
    stats = endpoint.statistics()
    assert (stats.unhandled_other, stats.unhandled_quic) == (1, 1)


async def test_a_failing_handler_does_not_stop_the_socket(nursery):
    endpoint = UdpEndpoint()
    address = await nursery.start(endpoint.run)
    seen = []

    def handler(data, addr):
        if data == b"\x01boom":
            raise RuntimeError("handler bug")
        seen.append(data)

    endpoint.set_datagram_handler(handler)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"\x01boom", address)
        sender.sendto(b"\x01fine", address)
        await wait_until(lambda: seen == [b"\x01fine"])
    assert endpoint.statistics().handler_errors == 1


async def test_send_reaches_peer_and_is_counted(nursery):
    endpoint = UdpEndpoint()
    await nursery.start(endpoint.run)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(2.0)
        await endpoint.send(b"\x01hello", receiver.getsockname())
        data, source = await trio.to_thread.run_sync(receiver.recvfrom, 100)
    assert data == b"\x01hello"
    assert source == endpoint.local_address
    assert endpoint.statistics().datagrams_sent == 1


async def test_local_address_before_bind_is_an_error():
    from cloudless.transport.base import TransportError

    with pytest.raises(TransportError):
        _ = UdpEndpoint().local_address
