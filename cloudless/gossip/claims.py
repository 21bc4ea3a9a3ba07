"""Self-claims: what only a member may say about itself, signed by it.

Every member holds the cluster keyring, so the keyring proves only that a
packet came from *some* member. A member's own `alive(incarnation, meta)`
and `leave(incarnation)` are therefore signed with its node key (the key of
its node certificate, ECDSA P-256, raw r||s: 64 bytes), once per change of
incarnation or metadata, never per packet. The signature covers the cluster
id, the member's name, the incarnation, the state claimed, the metadata
version and a SHA-256 of the address and metadata, so it cannot be moved to
another cluster, member, incarnation or address.

Receivers look the member's public keys up through a plain function
(`MemberKeys`) the node backs with the replicated state: `None` for a name
the cluster never registered (a joiner not yet known: accepted as before,
for its join), an empty tuple for a removed name (nothing it says verifies).
Signing is deterministic (RFC 6979), so simulations replay byte for byte.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from cloudless.gossip.metadata import Metadata

SIGNATURE_SIZE = 64
CLAIM_ALIVE = 0  # members.ALIVE
CLAIM_LEFT = 3  # members.LEFT
_DOMAIN = "cloudless.gossip.claim/1"
_SIGNING = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_VERIFYING = ec.ECDSA(hashes.SHA256())

MemberKeys = Callable[[str], Sequence[ec.EllipticCurvePublicKey] | None]
Signer = Callable[[bytes], bytes]

_encoder = msgspec.msgpack.Encoder()


def claim_bytes(
    cluster: str, name: str, incarnation: int, state: int, meta_version: int, addr: str, meta: Metadata | None
) -> bytes:
    """The exact bytes a self-claim signature covers."""
    digest = hashlib.sha256(_encoder.encode((addr, meta))).digest()
    return _encoder.encode((_DOMAIN, cluster, name, incarnation, state, meta_version, digest))


def ecdsa_signer(key: ec.EllipticCurvePrivateKey) -> Signer:
    """Sign with a P-256 key, returning raw r||s (64 bytes, not DER's ~72)."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("gossip claims are signed with P-256 node keys")

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, _SIGNING))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def verify_raw(key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
    if len(signature) != SIGNATURE_SIZE:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, _VERIFYING)
    except InvalidSignature:
        return False
    return True


class VerificationCache:
    """Verdicts of (claim, signature, key set) already checked, bounded (LRU).
    A claim is re-gossiped and re-merged many times; it is verified once.
    One cache may be shared by many cores in one process (the simulator)."""

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._verdicts: OrderedDict[bytes, bool] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> bool | None:
        verdict = self._verdicts.get(key)
        if verdict is not None:
            self._verdicts.move_to_end(key)
            self.hits += 1
        return verdict

    def put(self, key: bytes, verdict: bool) -> None:
        self.misses += 1
        self._verdicts[key] = verdict
        if len(self._verdicts) > self.size:
            self._verdicts.popitem(last=False)


class SelfClaims:
    """Signs this member's claims and verifies other members' (pure: the key
    lookup is a function of the replicated state, no IO)."""

    def __init__(
        self, cluster: str, sign: Signer, member_keys: MemberKeys, cache: VerificationCache | None = None
    ) -> None:
        self.cluster = cluster
        self._sign = sign
        self.member_keys = member_keys
        self.cache = cache if cache is not None else VerificationCache()

    def sign(
        self, name: str, incarnation: int, state: int, meta_version: int, addr: str, meta: Metadata | None
    ) -> bytes:
        return self._sign(claim_bytes(self.cluster, name, incarnation, state, meta_version, addr, meta))

    def knows(self, name: str) -> bool:
        """Whether the cluster registered `name` (its claims must then be signed)."""
        return self.member_keys(name) is not None

    def verify(
        self,
        name: str,
        incarnation: int,
        state: int,
        meta_version: int,
        addr: str,
        meta: Metadata | None,
        signature: bytes,
    ) -> bool | None:
        """True: signed by one of the member's keys; False: not (or unsigned);
        None: the member is unknown to the cluster, so nothing can be checked."""
        keys = self.member_keys(name)
        if keys is None:
            return None
        if len(signature) != SIGNATURE_SIZE or not keys:
            return False
        data = claim_bytes(self.cluster, name, incarnation, state, meta_version, addr, meta)
        cache_key = hashlib.sha256(data + signature + b"".join(_key_id(k) for k in keys)).digest()
        verdict = self.cache.get(cache_key)
        if verdict is None:
            verdict = any(verify_raw(k, data, signature) for k in keys)
            self.cache.put(cache_key, verdict)
        return verdict


def _key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    n = key.public_numbers()
    return n.x.to_bytes(32, "big") + n.y.to_bytes(32, "big")
