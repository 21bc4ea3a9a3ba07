"""The pinned aioquic hook that makes QUIC servers require client certificates.

These tests drive two sans-IO `MutualTlsQuicConnection`s against each other in
memory (no sockets, no trio), so every handshake flight is deterministic.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aioquic import tls
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode

from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import issue_credentials
from cloudless.pki.errors import PeerRejected
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.quic_tls_hook import (
    PINNED_AIOQUIC_VERSION,
    MutualTlsQuicConnection,
    UnsupportedAioquicVersion,
    check_aioquic_version,
    rejection_from_close,
)

NOW = datetime.now(UTC)
CLIENT_ADDR = ("10.0.0.1", 4433)
SERVER_ADDR = ("10.0.0.2", 4433)


@pytest.fixture(scope="module")
def pki():
    ca = ClusterCA.create("c1", NOW)
    revocations = RevocationList()
    return {
        "ca": ca,
        "revocations": revocations,
        "verifier": PeerVerifier(ca.certificate, revocations, "c1"),
        "server": issue_credentials(ca, Identity.node("c1", "server"), NOW),
        "client": issue_credentials(ca, Identity.client("c1", "alice"), NOW),
    }


def make_connection(credentials, verifier, *, is_client: bool, client=None) -> MutualTlsQuicConnection:
    configuration = QuicConfiguration(is_client=is_client, alpn_protocols=["cloudless/1"])
    if credentials is not None:
        configuration.certificate = credentials.certificate
        configuration.private_key = credentials.private_key
    kwargs = {}
    if not is_client:  # the server learns this from the client's first Initial (RFC 9000 §7.3)
        kwargs["original_destination_connection_id"] = client._peer_cid.cid
    return MutualTlsQuicConnection(configuration=configuration, verify_peer=verifier.verify, **kwargs)


def make_client(credentials, verifier) -> MutualTlsQuicConnection:
    client = make_connection(credentials, verifier, is_client=True)
    client.connect(SERVER_ADDR, now=0.0)
    return client


def run_handshake(client: MutualTlsQuicConnection, server: MutualTlsQuicConnection, rounds: int = 10) -> float:
    """Exchange datagrams until both sides go quiet; returns the simulated time reached."""
    now = 0.0
    for _ in range(rounds):
        now += 0.01
        quiet = True
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, CLIENT_ADDR, now)
            quiet = False
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, SERVER_ADDR, now)
            quiet = False
        if quiet:
            break
    return now


def drain(connection: MutualTlsQuicConnection) -> list[events.QuicEvent]:
    out = []
    while (event := connection.next_event()) is not None:
        out.append(event)
    return out


def test_aioquic_version_is_the_pinned_one():
    check_aioquic_version()  # the installed version imports cleanly


def test_other_aioquic_version_is_refused_with_a_clear_error():
    with pytest.raises(UnsupportedAioquicVersion) as caught:
        check_aioquic_version("1.8.0")
    assert PINNED_AIOQUIC_VERSION in caught.value.message
    assert "1.8.0" in caught.value.message


def test_mutual_handshake_verifies_both_identities(pki):
    client = make_client(pki["client"], pki["verifier"])
    server = make_connection(pki["server"], pki["verifier"], is_client=False, client=client)
    run_handshake(client, server)
    assert any(isinstance(e, events.HandshakeCompleted) for e in drain(server))
    assert any(isinstance(e, events.HandshakeCompleted) for e in drain(client))
    assert server.peer_identity is not None and server.peer_identity.uri == "spiffe://c1/client/alice"
    assert client.peer_identity is not None and client.peer_identity.uri == "spiffe://c1/node/server"
    # RFC 9001 §4.1.2: HANDSHAKE_DONE tells the client its certificate was accepted.
    assert client.handshake_confirmed


def test_server_requires_client_certificate_rfc8446_4_4_2_4(pki):
    """A client that answers the CertificateRequest with an empty Certificate is refused."""
    client = make_client(None, pki["verifier"])
    server = make_connection(pki["server"], pki["verifier"], is_client=False, client=client)
    run_handshake(client, server)

    # Server side: rejected inside TLS, the handshake never completes.
    assert server.peer_identity is None
    assert server.local_rejection is not None and server.local_rejection.reason == "no_certificate"
    assert not any(isinstance(e, events.HandshakeCompleted) for e in drain(server))
    close = server._close_event
    assert close.error_code == QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.certificate_required

    # Client side: the CONNECTION_CLOSE names the reason.
    assert not client.handshake_confirmed
    client_close = client._close_event
    assert client_close is not None
    assert client_close.error_code == QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.certificate_required
    rejection = rejection_from_close(client_close.error_code, client_close.reason_phrase)
    assert isinstance(rejection, PeerRejected)
    assert rejection.reason == "no_certificate"
    assert "refused our certificate" in rejection.message


def test_server_runs_the_peer_verifier_on_the_client_chain(pki):
    revoked = issue_credentials(pki["ca"], Identity.client("c1", "mallory"), NOW)
    revocations = RevocationList()
    revocations.add(revoked.serial, revoked.not_after)
    verifier = PeerVerifier(pki["ca"].certificate, revocations, "c1")
    client = make_client(revoked, verifier)
    server = make_connection(pki["server"], verifier, is_client=False, client=client)
    run_handshake(client, server)
    assert server.local_rejection.reason == "revoked"
    close = client._close_event
    assert close.error_code == QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.certificate_revoked
    assert rejection_from_close(close.error_code, close.reason_phrase).reason == "revoked"


def test_client_verifies_server_against_cluster_ca_not_hostname(pki):
    other_ca = ClusterCA.create("c1", NOW)
    impostor = issue_credentials(other_ca, Identity.node("c1", "server"), NOW)
    client = make_client(pki["client"], pki["verifier"])
    server = make_connection(
        impostor, PeerVerifier(other_ca.certificate, RevocationList(), "c1"), is_client=False, client=client
    )
    run_handshake(client, server)
    assert client.local_rejection is not None and client.local_rejection.reason == "unknown_ca"
    assert client.peer_identity is None
    close = server._close_event
    assert close.error_code == QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.unknown_ca
    assert rejection_from_close(close.error_code, close.reason_phrase).reason == "unknown_ca"


def test_expired_client_is_refused_with_certificate_expired_alert(pki):
    expired = issue_credentials(pki["ca"], Identity.client("c1", "old"), NOW - timedelta(days=2), timedelta(hours=1))
    client = make_client(expired, pki["verifier"])
    server = make_connection(pki["server"], pki["verifier"], is_client=False, client=client)
    run_handshake(client, server)
    assert server.local_rejection.reason == "expired"
    assert client._close_event.error_code == QuicErrorCode.CRYPTO_ERROR + tls.AlertDescription.certificate_expired


def test_unrelated_close_is_not_mistaken_for_a_rejection():
    assert rejection_from_close(QuicErrorCode.NO_ERROR, "peer_rejected:revoked: x") is None
    assert rejection_from_close(QuicErrorCode.CRYPTO_ERROR + 42, "bad record") is None
    assert rejection_from_close(QuicErrorCode.CRYPTO_ERROR + 42, "peer_rejected:nonsense: x") is None
