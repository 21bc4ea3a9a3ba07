"""Where this node's gossip gets its keys (issue 13: gossip a keyholder
alone cannot forge).

- This node signs its own gossip claims with the key of its current node
  certificate (it follows renewals).
- Members' public keys come from the replicated state (`node_public_keys`)
  on nodes in the Raft configuration; nodes outside it hold no copy of the
  state and fetch a copy from the leader (`gossip.keys`, node identities
  only), alongside the revocation list.
- The keyring: installed from Raft on change (or from the same fetch), and
  rotated by the leader after a node is removed (`rotation_step`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloudless.errors import NotFound
from cloudless.gossip.claims import SelfClaims, ecdsa_signer
from cloudless.gossip.keyring import Keyring, key_id
from cloudless.pki.credentials import Credentials
from cloudless.state.commands import SetGossipKeyring
from cloudless.state.fsm import StateMachine

log = logging.getLogger(__name__)

# After a rotation, how long the old gossip key keeps opening packets: long
# enough for nodes outside Raft to fetch the new one (they poll every 5 s).
GOSSIP_KEY_OVERLAP_S = float(os.environ.get("CLOUDLESS_GOSSIP_KEY_OVERLAP", "15"))
MAX_MEMBERS = 100_000


class GossipKeysReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a node outside Raft needs for gossip: the keyring and every
    registered node's certificate public keys; `removed`: names whose claims
    must never verify."""

    keyring: list[bytes]
    members: dict[str, list[bytes]]
    removed: list[str]


_reply_decoder = msgspec.msgpack.Decoder(GossipKeysReply)


def public_key_der(credentials: Credentials) -> bytes:
    return credentials.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def keys_reply(fsm: StateMachine, caller: str) -> GossipKeysReply:
    """The `gossip.keys` answer, for a registered node only (a removed one's
    certificate is revoked anyway; this keeps a stale state from serving it)."""
    if caller not in fsm.nodes:
        raise NotFound(f"node {caller} is not registered, so it gets no gossip keys")
    # A node registered before keys were recorded stays out: unknown, not keyless.
    members = {name: keys for name in fsm.nodes if (keys := fsm.node_public_keys(name)) is not None}
    removed = sorted(i.removeprefix("node/") for i in fsm.retired if i.startswith("node/"))
    return GossipKeysReply(list(fsm.gossip_keys), members, removed)


def decode_reply(raw: bytes) -> GossipKeysReply:
    reply = _reply_decoder.decode(raw)
    if not 1 <= len(reply.keyring) <= 8 or any(len(k) != 32 for k in reply.keyring):
        raise msgspec.ValidationError("gossip keyring must hold 1-8 keys of 32 bytes")
    if len(reply.members) > MAX_MEMBERS or len(reply.removed) > MAX_MEMBERS:
        raise msgspec.ValidationError("too many members")
    return reply


class GossipIdentity:
    """Signer and member-key lookup for one node's `GossipCore`."""

    def __init__(
        self,
        cluster_id: str,
        credentials: Callable[[], Credentials],
        fsm: Callable[[], StateMachine | None],
        in_raft: Callable[[], bool],
    ) -> None:
        self.cluster_id = cluster_id
        self._credentials = credentials
        self._fsm = fsm
        self._in_raft = in_raft
        self._synced: GossipKeysReply | None = None
        self._parsed: dict[bytes, ec.EllipticCurvePublicKey | None] = {}
        self._signer: tuple[bytes, Callable[[bytes], bytes]] | None = None

    def claims(self) -> SelfClaims:
        return SelfClaims(self.cluster_id, self.sign, self.member_keys)

    def sign(self, data: bytes) -> bytes:
        credentials = self._credentials()
        if self._signer is None or self._signer[0] != credentials.key_pem:
            self._signer = (credentials.key_pem, ecdsa_signer(credentials.private_key))
        return self._signer[1](data)

    def member_keys(self, name: str) -> tuple[ec.EllipticCurvePublicKey, ...] | None:
        ders = self._ders(name)
        if ders is None:
            return None
        keys = (self._parse(d) for d in ders)
        return tuple(k for k in keys if k is not None)

    def _ders(self, name: str) -> list[bytes] | None:
        fsm = self._fsm()
        if fsm is not None and self._in_raft() and fsm.applied_index > 0:
            return fsm.node_public_keys(name)
        synced = self._synced
        if synced is None:
            return None
        if name in synced.members:
            return synced.members[name]
        return [] if name in synced.removed else None

    def _parse(self, der: bytes) -> ec.EllipticCurvePublicKey | None:
        if der not in self._parsed:
            if len(self._parsed) > 4 * MAX_MEMBERS:
                self._parsed.clear()
            try:
                key = serialization.load_der_public_key(der)
            except ValueError:
                key = None
            self._parsed[der] = key if isinstance(key, ec.EllipticCurvePublicKey) else None
        return self._parsed[der]

    def install_synced(self, reply: GossipKeysReply) -> None:
        self._synced = reply


def install_keyring(keyring: Keyring, keys: list[bytes]) -> bool:
    """Make `keys` the keyring (first primary); True if anything changed."""
    if not keys or (keyring.primary_id == key_id(keys[0]) and set(keyring.key_ids) == {key_id(k) for k in keys}):
        return False
    keyring.replace(keys)
    return True


def rotation_step(fsm: StateMachine, now: float) -> SetGossipKeyring | None:
    """The leader's next gossip keyring change, if any: a fresh primary after
    a node was removed (the old key still opens packets), then, once the
    overlap has passed, the old keys dropped."""
    keys = fsm.gossip_keys
    if not keys:
        return None
    if fsm.gossip_rekey:
        return SetGossipKeyring([os.urandom(32), *keys][:2])
    if len(keys) > 1 and now - fsm.gossip_keys_at >= GOSSIP_KEY_OVERLAP_S:
        return SetGossipKeyring(keys[:1])
    return None
