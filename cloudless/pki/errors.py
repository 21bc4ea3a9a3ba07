"""Errors of the cluster PKI.

Each carries a machine-readable `reason` where callers branch on it: the
transports turn `PeerRejected.reason` into the close reason they log, the join
service turns `TokenRejected.reason` into the answer a joiner sees.
"""

from __future__ import annotations

from typing import Literal, get_args

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from cloudless.errors import CloudlessError, InvalidInput

PeerRejectReason = Literal[
    "no_certificate",
    "malformed",  # the peer's certificate bytes do not parse as X.509
    "unknown_ca",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "revoked",
    "bad_identity",
    "wrong_cluster",
]
PEER_REJECT_REASONS: frozenset[str] = frozenset(get_args(PeerRejectReason))
_PEER_REJECT_REASON_BY_NAME: dict[str, PeerRejectReason] = {r: r for r in get_args(PeerRejectReason)}


def peer_reject_reason(name: str) -> PeerRejectReason | None:
    """`name` as a rejection reason (e.g. read from a peer's close message), or None if it is none."""
    return _PEER_REJECT_REASON_BY_NAME.get(name)


TokenRejectReason = Literal["malformed", "forged", "expired", "used_up", "wrong_role", "unknown"]
TOKEN_REJECT_REASONS: frozenset[str] = frozenset(get_args(TokenRejectReason))


class PKIError(CloudlessError):
    """Base of every PKI failure."""

    code = "pki_error"


class InvalidIdentity(PKIError, InvalidInput):
    """A cluster id, node/client name or SPIFFE URI is not a Cloudless identity."""

    exit_code = 2
    code = "invalid_identity"


class InvalidCSR(PKIError, InvalidInput):
    """A certificate signing request is malformed, badly signed or has the wrong key type."""

    exit_code = 2
    code = "invalid_csr"


class InvalidCredentials(PKIError, InvalidInput):
    """Stored or received credentials do not parse or do not belong together."""

    exit_code = 2
    code = "invalid_credentials"


class PeerRejected(PKIError):
    """A peer's certificate chain failed verification; `reason` says which check."""

    code = "peer_rejected"

    def __init__(self, reason: PeerRejectReason, message: str | None = None, **context: object) -> None:
        if reason not in PEER_REJECT_REASONS:
            raise ValueError(f"unknown peer rejection reason {reason!r}")
        super().__init__(message or f"peer certificate rejected: {reason}", reason=reason, **context)
        self.reason: PeerRejectReason = reason


class TokenRejected(PKIError):
    """A bootstrap token was refused; `reason` says why."""

    code = "token_rejected"

    def __init__(self, reason: TokenRejectReason, message: str | None = None, **context: object) -> None:
        if reason not in TOKEN_REJECT_REASONS:
            raise ValueError(f"unknown token rejection reason {reason!r}")
        super().__init__(message or f"bootstrap token rejected: {reason}", reason=reason, **context)
        self.reason: TokenRejectReason = reason


class InvalidRevocationList(PKIError, InvalidInput):
    """Serialized revocation list bytes do not decode or validate."""

    exit_code = 2
    code = "invalid_revocation_list"


# What cryptography raises on malformed certificate/CSR/key bytes. Fields parse
# lazily, so these can surface on first attribute access, not only at load.
X509_PARSE_ERRORS = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)
