"""TLS/TCP and WebSocket carriers: the mutual-authentication rejection matrix
(issue 2), on real sockets with real certificates. Every refused peer gets a
clear error naming the reason, and the listener keeps serving good clients."""

from __future__ import annotations

import functools
import ssl
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.errors import PeerRejected
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.base import ConnectionLost
from cloudless.transport.tls import TlsCarrier
from cloudless.transport.websocket import WebSocketCarrier
from tests.harness.waiting import wait_until

NOW = datetime.now(UTC)
CLUSTER = "tls-test"
CA = ClusterCA.create(CLUSTER, NOW)
OTHER_CA = ClusterCA.create(CLUSTER, NOW)  # same cluster id and name, different key
SERVER = issue_credentials(CA, Identity(CLUSTER, "node", "server"), NOW)
GOOD = issue_credentials(CA, Identity(CLUSTER, "node", "good"), NOW)


def forged(san: x509.GeneralName) -> SimpleNamespace:
    """A leaf signed by the real cluster CA but carrying an arbitrary SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")]))
        .issuer_name(CA.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=1))
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(CA.private_key.public_key()), critical=False)
        .sign(CA.private_key, hashes.SHA256())
    )
    return SimpleNamespace(
        ca_pem=CA.certificate_pem,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def bad_clients(revocations: RevocationList) -> dict[str, object]:
    expired = issue_credentials(CA, Identity(CLUSTER, "node", "old"), NOW - timedelta(days=3), timedelta(hours=1))
    revoked = issue_credentials(CA, Identity(CLUSTER, "node", "revoked"), NOW)
    revocations.add(revoked.serial, revoked.not_after)
    other = issue_credentials(OTHER_CA, Identity(CLUSTER, "node", "stranger"), NOW)
    # The client trusts our CA (so it gets as far as presenting its own certificate).
    other = SimpleNamespace(ca_pem=CA.certificate_pem, cert_pem=other.cert_pem, key_pem=other.key_pem)
    return {
        "expired": expired,
        "revoked": revoked,
        "unknown_ca": other,
        "bad_identity": forged(x509.UniformResourceIdentifier("https://example.com/not-cloudless")),
        "wrong_cluster": forged(x509.UniformResourceIdentifier("spiffe://another-cluster/node/x")),
    }


# "tls-enrollment": a node's listener that also serves token enrollment, where
# the main context only *asks* for a client certificate; the matrix must hold there too.
CARRIERS = {
    "tls": TlsCarrier,
    "tls-enrollment": functools.partial(TlsCarrier, enrollment=True),
    "websocket": WebSocketCarrier,
}


@pytest.fixture(params=sorted(CARRIERS))
def carrier_cls(request):
    return CARRIERS[request.param]


async def echo_handler(conn) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            stream = await conn.accept_stream()

            async def echo(stream=stream):
                data = await stream.receive_some()
                await stream.send_all(data)
                await stream.send_eof()

            nursery.start_soon(echo)


async def round_trip(conn, payload: bytes) -> bytes:
    stream = await conn.open_stream()
    await stream.send_all(payload)
    await stream.send_eof()
    out = b""
    while chunk := await stream.receive_some():
        out += chunk
    await stream.aclose()
    return out


@pytest.mark.parametrize("case", ["expired", "revoked", "unknown_ca", "bad_identity", "wrong_cluster"])
async def test_server_refuses_bad_client_certificate_and_keeps_serving(carrier_cls, case):
    revocations = RevocationList()
    verifier = PeerVerifier(CA.certificate, revocations, CLUSTER)
    clients = bad_clients(revocations)
    server = carrier_cls(SERVER, verifier)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, echo_handler)
        bad = carrier_cls(clients[case], verifier)
        with trio.fail_after(10):
            with pytest.raises(PeerRejected) as info:
                await bad.connect(address)
        assert info.value.reason == case, info.value.message
        assert "refused our certificate" in info.value.message
        assert server.rejected == 1
        assert server.statistics()["rejections"] == {case: 1}
        good = carrier_cls(GOOD, verifier)
        conn = await good.connect(address)
        assert conn.peer.uri == f"spiffe://{CLUSTER}/node/server"
        assert await round_trip(conn, b"still serving") == b"still serving"
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_client_without_certificate_is_refused(carrier_cls):
    verifier = PeerVerifier(CA.certificate, RevocationList(), CLUSTER)
    server = carrier_cls(SERVER, verifier)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, echo_handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=CA.certificate_pem.decode())
        tcp = await trio.open_tcp_stream(*address)
        stream = trio.SSLStream(tcp, context, server_hostname=None)
        with trio.fail_after(10):
            await stream.do_handshake()  # TLS 1.3: the client finishes before the server judges it
            if isinstance(carrier_cls, functools.partial):
                # Certificate optional at the TLS layer: refused by the verdict instead.
                verdict = await stream.receive_some()
                assert verdict[:1] == b"\x01" and b"no_certificate" in verdict
            else:
                with pytest.raises(trio.BrokenResourceError) as info:
                    await stream.receive_some()
                assert "certificate required" in str(info.value.__cause__).lower()
        await trio.aclose_forcefully(stream)
        with trio.fail_after(5):
            await wait_until(lambda: server.rejected >= 1, interval=0.01)
        conn = await carrier_cls(GOOD, verifier).connect(address)
        assert await round_trip(conn, b"ok") == b"ok"
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_client_refuses_a_revoked_server(carrier_cls):
    revocations = RevocationList()
    verifier = PeerVerifier(CA.certificate, revocations, CLUSTER)
    revocations.add(SERVER.serial, SERVER.not_after)
    server = carrier_cls(SERVER, PeerVerifier(CA.certificate, RevocationList(), CLUSTER))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, echo_handler)
        with pytest.raises(PeerRejected) as info:
            await carrier_cls(GOOD, verifier).connect(address)
        assert info.value.reason == "revoked"
        nursery.cancel_scope.cancel()


async def test_client_refuses_a_server_from_another_ca():
    verifier = PeerVerifier(CA.certificate, RevocationList(), CLUSTER)
    impostor = issue_credentials(OTHER_CA, Identity(CLUSTER, "node", "server"), NOW)
    server = TlsCarrier(impostor, PeerVerifier(OTHER_CA.certificate, RevocationList(), CLUSTER))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, echo_handler)
        with pytest.raises(PeerRejected) as info:
            await TlsCarrier(GOOD, verifier).connect(address)
        assert info.value.reason == "unknown_ca"
        assert "presented an unacceptable certificate" in info.value.message
        nursery.cancel_scope.cancel()


async def test_stalled_handshakes_do_not_block_other_clients_and_time_out(carrier_cls):
    verifier = PeerVerifier(CA.certificate, RevocationList(), CLUSTER)
    server = carrier_cls(SERVER, verifier, handshake_timeout=0.5)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, echo_handler)
        # Ten clients connect over TCP and never say a word; one sends garbage.
        silent = [await trio.open_tcp_stream(*address) for _ in range(10)]
        garbage = await trio.open_tcp_stream(*address)
        await garbage.send_all(b"GET / HTTP/1.1\r\n\r\n" * 10)
        with trio.fail_after(3):  # well before the stalled handshakes time out... and after
            conn = await carrier_cls(GOOD, verifier).connect(address)
            assert await round_trip(conn, b"not blocked") == b"not blocked"
        with trio.fail_after(5):
            for tcp in silent:  # the server hangs up on each after handshake_timeout
                assert await tcp.receive_some() == b""
        with trio.fail_after(5):  # all eleven are counted as refused
            await wait_until(lambda: server.rejected >= 11, interval=0.01)
        await conn.aclose()
        for tcp in [*silent, garbage]:
            await tcp.aclose()
        nursery.cancel_scope.cancel()


async def test_connect_to_a_closed_port_is_connection_lost(carrier_cls):
    verifier = PeerVerifier(CA.certificate, RevocationList(), CLUSTER)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(ConnectionLost):
        await carrier_cls(GOOD, verifier).connect(("127.0.0.1", port))


async def test_connect_to_a_silent_server_times_out_at_the_handshake_timeout(carrier_cls):
    verifier = PeerVerifier(CA.certificate, RevocationList(), CLUSTER)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    start = trio.current_time()
    with pytest.raises(ConnectionLost, match="timed out"):
        await carrier_cls(GOOD, verifier, handshake_timeout=0.3).connect(listener.socket.getsockname()[:2])
    assert trio.current_time() - start < 2
    await listener.aclose()


async def test_client_refuses_a_server_presenting_a_client_certificate(carrier_cls):
    """Only nodes serve: a stolen CLI certificate must not let its holder pose as a node."""
    verifier = PeerVerifier(CA.certificate, RevocationList(), CLUSTER)
    posing = issue_credentials(CA, Identity(CLUSTER, "client", "mallory"), NOW, role="admin")
    server = carrier_cls(posing, PeerVerifier(CA.certificate, RevocationList(), CLUSTER))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, echo_handler)
        with pytest.raises(PeerRejected) as info:
            await carrier_cls(GOOD, verifier).connect(address)
        assert info.value.reason == "bad_identity"
        assert "not a node identity" in info.value.message
        nursery.cancel_scope.cancel()
