"""Bootstrap tokens: how a new device or admin proves it may join (kubeadm style).

A token reads `cl1.<id>.<secret>.<ca-sha256-hex>`:
- `id` (8 base32 chars) names the stored record and is not secret;
- `secret` (26 base32 chars = 128 random bits) is stored only as its SHA-256.
  The secret is uniformly random and long, so a fast unsalted hash is enough:
  there is no dictionary to attack, and brute force is 2^128 either way;
- the CA fingerprint lets the joiner pin the cluster CA it is shown before it
  sends the secret or a CSR, so a man in the middle cannot impersonate the
  cluster.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal, Protocol

import msgspec
from cryptography import x509

from cloudless.pki.ca import certificate_fingerprint
from cloudless.pki.clock import as_utc
from cloudless.pki.errors import X509_PARSE_ERRORS, InvalidCredentials, TokenRejected

TOKEN_PREFIX = "cl1"
FORMAT_VERSION = 1
ID_LENGTH = 8
SECRET_BYTES = 16
SECRET_LENGTH = 26  # base32 of 16 bytes, unpadded
MAX_TTL = timedelta(days=30)
MAX_USES = 1_000_000

# A token enrolls a node, or a client with one of the client roles (authz).
TokenRole = Literal["node", "admin", "operator", "viewer"]
ROLES = ("node", "admin", "operator", "viewer")

_B32 = "[a-z2-7]"
_TOKEN_PATTERN = re.compile(rf"{TOKEN_PREFIX}\.({_B32}{{{ID_LENGTH}}})\.({_B32}{{{SECRET_LENGTH}}})\.([0-9a-f]{{64}})")
_ID_PATTERN = re.compile(rf"{_B32}{{{ID_LENGTH}}}")


class RandomBytes(Protocol):
    """`secrets` (the default) or anything with `token_bytes`; a seeded
    `random.Random` (which has `randbytes`) also works, for tests."""

    def token_bytes(self, nbytes: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ParsedToken:
    id: str
    secret: str
    ca_fingerprint: str  # "sha256:<hex>", comparable with ClusterCA.fingerprint

    def __repr__(self) -> str:  # never log the secret
        return f"ParsedToken(id={self.id!r}, secret=<redacted>, ca_fingerprint={self.ca_fingerprint!r})"


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the cluster stores for a token (in Raft): never the secret itself."""

    version: Annotated[int, msgspec.Meta(ge=1)] = FORMAT_VERSION
    id: Annotated[str, msgspec.Meta(pattern=f"^{_B32}{{{ID_LENGTH}}}$")]
    secret_hash: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    role: TokenRole
    created_at: datetime
    expires_at: datetime
    max_uses: Annotated[int, msgspec.Meta(ge=1, le=MAX_USES)]
    uses: Annotated[int, msgspec.Meta(ge=0)] = 0

    def check(self, secret: str, role: str, now: datetime) -> None:
        """Accept `secret` for `role` at `now`, or raise TokenRejected.

        The secret is checked first so that a caller without it learns nothing
        about the token's state.
        """
        now = as_utc(now)
        if not isinstance(secret, str) or not hmac.compare_digest(hash_secret(secret), self.secret_hash):
            raise TokenRejected("forged", "bootstrap token secret does not match", token_id=self.id)
        if now >= self.expires_at:
            raise TokenRejected(
                "expired", f"bootstrap token {self.id} expired at {self.expires_at.isoformat()}", token_id=self.id
            )
        if self.uses >= self.max_uses:
            raise TokenRejected(
                "used_up", f"bootstrap token {self.id} was used {self.uses} of {self.max_uses} times", token_id=self.id
            )
        if role != self.role:
            raise TokenRejected(
                "wrong_role", f"bootstrap token {self.id} grants {self.role}, not {role}", token_id=self.id
            )

    def consumed(self) -> TokenRecord:
        return msgspec.structs.replace(self, uses=self.uses + 1)

    def redeem(self, secret: str, role: str, now: datetime) -> TokenRecord:
        """`check`, then the record to store back (one more use); raises TokenRejected."""
        self.check(secret, role, now)
        return self.consumed()

    def is_expired(self, now: datetime) -> bool:
        return as_utc(now) >= self.expires_at

    def to_bytes(self) -> bytes:
        return _record_encoder.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenRecord:
        try:
            record = _record_decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidCredentials(f"token record does not decode: {exc}") from exc
        if record.version != FORMAT_VERSION:
            raise InvalidCredentials(f"unsupported token record format version {record.version}")
        return record


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(TokenRecord)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def create_token(
    ca_fingerprint: str,
    role: TokenRole,
    ttl: timedelta,
    max_uses: int,
    now: datetime,
    rng: RandomBytes = secrets,  # type: ignore[assignment]
) -> tuple[str, TokenRecord]:
    """A new token string (show it once) and the record to store."""
    now = as_utc(now)
    if role not in ROLES:
        raise ValueError(f"token role must be node or admin, got {role!r}")
    if not timedelta(0) < ttl <= MAX_TTL:
        raise ValueError(f"token TTL must be in (0, {MAX_TTL}], got {ttl}")
    if not isinstance(max_uses, int) or not 1 <= max_uses <= MAX_USES:
        raise ValueError(f"token max_uses must be in [1, {MAX_USES}], got {max_uses!r}")
    fingerprint_hex = _fingerprint_hex(ca_fingerprint)
    if fingerprint_hex is None:
        raise ValueError(f"CA fingerprint must be sha256:<64 hex>, got {ca_fingerprint!r}")
    draw = getattr(rng, "token_bytes", None) or rng.randbytes  # type: ignore[attr-defined]
    token_id = _b32(draw(5))
    secret = _b32(draw(SECRET_BYTES))
    record = TokenRecord(
        id=token_id,
        secret_hash=hash_secret(secret),
        role=role,
        created_at=now,
        expires_at=now + ttl,
        max_uses=max_uses,
    )
    return f"{TOKEN_PREFIX}.{token_id}.{secret}.{fingerprint_hex}", record


def parse_token(text: str) -> ParsedToken:
    if not isinstance(text, str):
        raise TokenRejected("malformed", f"bootstrap token must be text, got {type(text).__name__}")
    match = _TOKEN_PATTERN.fullmatch(text.strip())
    if match is None:
        # Do not echo the text: it may be a real token with a typo.
        raise TokenRejected("malformed", f"not a bootstrap token: want {TOKEN_PREFIX}.<id>.<secret>.<ca-sha256>")
    token_id, secret, fingerprint_hex = match.groups()
    return ParsedToken(token_id, secret, "sha256:" + fingerprint_hex)


def is_token_id(text: str) -> bool:
    return isinstance(text, str) and _ID_PATTERN.fullmatch(text) is not None


def pin_matches(ca_certificate: x509.Certificate | bytes, fingerprint: str) -> bool:
    """True iff the CA certificate (object, PEM or DER) has the pinned SHA-256 fingerprint."""
    expected = _fingerprint_hex(fingerprint)
    if expected is None:
        return False
    if isinstance(ca_certificate, (bytes, bytearray, memoryview)):
        data = bytes(ca_certificate)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                ca_certificate = x509.load_pem_x509_certificate(data)
            else:
                ca_certificate = x509.load_der_x509_certificate(data)
        except X509_PARSE_ERRORS:
            return False
    if not isinstance(ca_certificate, x509.Certificate):
        return False
    actual = certificate_fingerprint(ca_certificate).removeprefix("sha256:")
    return hmac.compare_digest(actual, expected)


def _fingerprint_hex(fingerprint: str) -> str | None:
    if not isinstance(fingerprint, str):
        return None
    value = fingerprint.strip().lower().removeprefix("sha256:")
    if re.fullmatch(r"[0-9a-f]{64}", value) is None:
        return None
    return value


__all__ = [
    "ParsedToken",
    "TokenRecord",
    "create_token",
    "hash_secret",
    "is_token_id",
    "parse_token",
    "pin_matches",
]
