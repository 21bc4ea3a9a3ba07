"""The one place Cloudless reaches into aioquic's private TLS state.

aioquic 1.7 servers cannot *require* a client certificate through public API:
`tls.Context` only requests one behind a test-only flag
(`_request_client_certificate`), accepts an empty client Certificate message
(RFC 8446 §4.4.2.4 allows that; we must not) and never verifies the client's
chain. Its client-side check verifies against an OpenSSL store and a hostname,
where Cloudless wants the cluster CA as the only trust anchor and a SPIFFE
identity instead of a hostname.

`MutualTlsQuicConnection` re-classes the `tls.Context` that
`QuicConnection._initialize` builds into `_MutualTlsContext`, which

- on a server, sends a CertificateRequest and refuses an empty Certificate
  with the `certificate_required` alert (RFC 8446 §4.4.2.4, §6.2);
- on both sides, once the peer proved possession of its key
  (CertificateVerify), runs the `PeerVerifier` over the chain and turns a
  `PeerRejected` into a TLS alert inside the handshake, so an unverified peer
  never completes it;
- refuses to finish a server handshake without a verified peer at all (this
  also closes the PSK path, which skips CertificateRequest).

The alert travels in the CONNECTION_CLOSE frame's error code
(0x100 + alert, RFC 9001 §4.8) and its reason phrase names the Cloudless
rejection reason (`peer_rejected:<reason>: ...`), so the rejected side can say
exactly why (`rejection_from_close`).

Everything here depends on aioquic internals, so the module refuses to import
on any aioquic other than the pinned version.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence

import aioquic
from aioquic import tls
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509

from cloudless.pki.errors import PeerRejected, peer_reject_reason
from cloudless.transport.base import PeerIdentity, TransportError

PINNED_AIOQUIC_VERSION = "1.7.2"

REJECTION_PREFIX = "peer_rejected:"

PeerChainVerifier = Callable[[Sequence[x509.Certificate]], PeerIdentity]

# RFC 8446 §6.2 alert for each PeerRejected reason.
_ALERT_FOR_REASON: dict[str, tls.AlertDescription] = {
    "no_certificate": tls.AlertDescription.certificate_required,
    "malformed": tls.AlertDescription.bad_certificate,
    "unknown_ca": tls.AlertDescription.unknown_ca,
    "bad_signature": tls.AlertDescription.bad_certificate,
    "expired": tls.AlertDescription.certificate_expired,
    "not_yet_valid": tls.AlertDescription.certificate_expired,
    "revoked": tls.AlertDescription.certificate_revoked,
    "bad_identity": tls.AlertDescription.bad_certificate,
    "wrong_cluster": tls.AlertDescription.access_denied,
}


class UnsupportedAioquicVersion(TransportError):
    """The installed aioquic is not the version this hook was written against."""


def check_aioquic_version(version: str = aioquic.__version__) -> None:
    if version != PINNED_AIOQUIC_VERSION:
        raise UnsupportedAioquicVersion(
            f"cloudless.transport.quic_tls_hook patches aioquic {PINNED_AIOQUIC_VERSION} internals to "
            f"require client certificates, but aioquic {version} is installed; "
            f"install aioquic=={PINNED_AIOQUIC_VERSION} or re-audit the hook against the new version",
            installed=version,
            pinned=PINNED_AIOQUIC_VERSION,
        )


check_aioquic_version()


class PeerCertificateAlert(tls.Alert):
    """A TLS alert raised because the PeerVerifier rejected the peer's chain."""

    def __init__(self, rejection: PeerRejected) -> None:
        super().__init__(f"{REJECTION_PREFIX}{rejection.reason}: {rejection.message}")
        self.description = _ALERT_FOR_REASON.get(rejection.reason, tls.AlertDescription.bad_certificate)
        self.rejection = rejection


class _MutualTlsContext(tls.Context):
    # No __init__: instances are re-classed after aioquic configured them;
    # `_install_mutual_tls` sets the three attributes below.
    cloudless_verify: PeerChainVerifier
    cloudless_peer: PeerIdentity | None
    cloudless_rejection: PeerRejected | None

    def _cloudless_verify_peer(self) -> None:
        if self._peer_certificate is None:
            rejection = PeerRejected("no_certificate", "the peer sent no certificate")
        else:
            try:
                self.cloudless_peer = self.cloudless_verify([self._peer_certificate, *self._peer_certificate_chain])
                return
            except PeerRejected as exc:
                rejection = exc
        self.cloudless_rejection = rejection
        raise PeerCertificateAlert(rejection)

    def _client_handle_certificate_verify(self, input_buf) -> None:
        super()._client_handle_certificate_verify(input_buf)  # signature check; verify_mode is CERT_NONE
        self._cloudless_verify_peer()

    def _server_handle_certificate(self, input_buf) -> None:
        super()._server_handle_certificate(input_buf)
        if self._peer_certificate is None:  # empty Certificate: aioquic would go on without one
            self._cloudless_verify_peer()

    def _server_handle_certificate_verify(self, input_buf) -> None:
        super()._server_handle_certificate_verify(input_buf)
        self._cloudless_verify_peer()

    def _server_handle_finished(self, input_buf, output_buf) -> None:
        if self.cloudless_peer is None:
            self._cloudless_verify_peer()
        super()._server_handle_finished(input_buf, output_buf)


def _install_mutual_tls(context: tls.Context, verify: PeerChainVerifier, *, is_client: bool) -> None:
    context.__class__ = _MutualTlsContext
    assert isinstance(context, _MutualTlsContext)
    context.cloudless_verify = verify
    context.cloudless_peer = None
    context.cloudless_rejection = None
    context._verify_mode = ssl.CERT_NONE  # the PeerVerifier replaces aioquic's hostname-based check
    context._request_client_certificate = not is_client


class MutualTlsQuicConnection(QuicConnection):
    """A `QuicConnection` whose handshake requires and verifies a peer certificate on both sides."""

    def __init__(self, *, verify_peer: PeerChainVerifier, **kwargs) -> None:
        self._cloudless_verify_peer = verify_peer
        super().__init__(**kwargs)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        _install_mutual_tls(self.tls, self._cloudless_verify_peer, is_client=self._is_client)

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The verified peer, once its CertificateVerify was checked."""
        context = getattr(self, "tls", None)
        return context.cloudless_peer if isinstance(context, _MutualTlsContext) else None

    @property
    def local_rejection(self) -> PeerRejected | None:
        """Why we refused the peer's certificate, if we did."""
        context = getattr(self, "tls", None)
        return context.cloudless_rejection if isinstance(context, _MutualTlsContext) else None

    @property
    def handshake_confirmed(self) -> bool:
        """RFC 9001 §4.1.2: the client knows the server accepted its certificate."""
        return self._handshake_confirmed


def rejection_from_close(error_code: int, reason_phrase: str) -> PeerRejected | None:
    """The PeerRejected a peer announced in its CONNECTION_CLOSE, if it closed for that."""
    if not (QuicErrorCode.CRYPTO_ERROR <= error_code <= QuicErrorCode.CRYPTO_ERROR + 0xFF):
        return None
    if not reason_phrase.startswith(REJECTION_PREFIX):
        return None
    name, _, detail = reason_phrase[len(REJECTION_PREFIX) :].partition(":")
    reason = peer_reject_reason(name)
    if reason is None:
        return None
    return PeerRejected(
        reason,
        f"the peer refused our certificate: {reason} ({detail.strip()})",
        rejected_by="peer",
        tls_alert=error_code - QuicErrorCode.CRYPTO_ERROR,
    )
