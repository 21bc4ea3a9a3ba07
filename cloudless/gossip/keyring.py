"""AES-256-GCM sealing of gossip packets under a rotating cluster keyring.

Sealed datagram layout (49 bytes of overhead, `messages.SEAL_OVERHEAD`):

    0      1        5         13     21      33              -16
    | 0x01 | key id | sender  | seq  | nonce | ciphertext... | tag |

The first byte is below 0x40: the node's UDP socket is shared with QUIC, whose
packets always have bit 0x40 set, and the transport demultiplexes on it.
Bytes 0..33 are authenticated as associated data. `key id` is the first four
bytes of SHA-256(key), so a receiver picks the right key during rotation
without trial decryption. `sender` is a random 64-bit id the sealing process
draws at start and `seq` counts its packets: together they give replay
protection with a per-sender sliding window (as IPsec's anti-replay window,
RFC 4303 §3.4.3), in bounded memory. The nonce is random per packet as the
brief asks; with a 96-bit nonce the collision odds stay negligible far past
any packet count a member sends under one key.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloudless.errors import InvalidInput

VERSION_SEALED = 0x01
VERSION_PLAIN = 0x02  # tests and simulations only; a node never accepts it
HEADER = 1 + 4 + 8 + 8 + 12
TAG = 16
OVERHEAD = HEADER + TAG
WINDOW = 1024  # packets of reordering tolerated per sender


class KeyringError(InvalidInput):
    """A key was malformed or the keyring would be left without a primary."""


class UnsealError(InvalidInput):
    """A packet was dropped: `reason` is one of version, short, unknown_key,
    tampered, replayed."""

    def __init__(self, message: str, reason: str, **context: object) -> None:
        super().__init__(message, reason=reason, **context)
        self.reason = reason


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


class Keyring:
    """Primary key seals; every installed key opens (rotation: install the new
    key everywhere, make it primary everywhere, then remove the old one)."""

    def __init__(self, primary: bytes, secondary: list[bytes] | tuple[bytes, ...] = ()) -> None:
        self._keys: dict[bytes, AESGCM] = {}
        self._primary = b""
        self.install(primary)
        for k in secondary:
            self.install(k)
        self.use(primary)

    @staticmethod
    def _check(key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            raise KeyringError("gossip keys are 32 bytes (AES-256)", length=len(key) if key else 0)

    def install(self, key: bytes) -> None:
        self._check(key)
        self._keys[key_id(key)] = AESGCM(bytes(key))

    def use(self, key: bytes) -> None:
        """Make an installed key the one that seals."""
        kid = key_id(key)
        if kid not in self._keys:
            raise KeyringError("cannot make a key primary before installing it", key_id=kid.hex())
        self._primary = kid

    def remove(self, key: bytes) -> None:
        kid = key_id(key)
        if kid == self._primary:
            raise KeyringError("cannot remove the primary key", key_id=kid.hex())
        self._keys.pop(kid, None)

    def replace(self, keys: list[bytes] | tuple[bytes, ...]) -> None:
        """Become exactly `keys`, the first primary (a rotation step from the
        replicated keyring). Checks every key before changing anything."""
        if not keys:
            raise KeyringError("a keyring needs a primary key")
        for k in keys:
            self._check(k)
        fresh = {key_id(k): AESGCM(bytes(k)) for k in keys}
        self._keys = fresh
        self._primary = key_id(keys[0])

    @property
    def primary_id(self) -> bytes:
        return self._primary

    @property
    def key_ids(self) -> list[bytes]:
        return list(self._keys)

    def seal(self, header_prefix: bytes, nonce: bytes, payload: bytes) -> bytes:
        """`header_prefix` is sender id + seq (16 bytes); `nonce` is 12 random bytes."""
        header = bytes((VERSION_SEALED,)) + self._primary + header_prefix + nonce
        return header + self._keys[self._primary].encrypt(nonce, payload, header)

    def open(self, packet: bytes) -> tuple[bytes, int, bytes]:
        """(sender id, seq, payload); raises UnsealError."""
        if len(packet) < OVERHEAD:
            raise UnsealError("sealed gossip packet too short", "short", size=len(packet))
        if packet[0] != VERSION_SEALED:
            raise UnsealError("not a sealed gossip packet", "version", first_byte=packet[0])
        aead = self._keys.get(packet[1:5])
        if aead is None:
            raise UnsealError("gossip packet sealed with an unknown key", "unknown_key", key_id=packet[1:5].hex())
        header = packet[:HEADER]
        try:
            payload = aead.decrypt(packet[21:HEADER], packet[HEADER:], header)
        except InvalidTag:
            raise UnsealError("gossip packet failed authentication", "tampered") from None
        return packet[5:13], int.from_bytes(packet[13:21], "big"), payload


class ReplayWindow:
    """Per-sender highest sequence number plus a bitmap of the last WINDOW
    sequence numbers; at most `max_senders` senders remembered (least recently
    heard forgotten first)."""

    def __init__(self, max_senders: int = 65536) -> None:
        self.max_senders = max_senders
        self._senders: OrderedDict[bytes, list[int]] = OrderedDict()

    def check_and_record(self, sender: bytes, seq: int) -> bool:
        state = self._senders.get(sender)
        if state is None:
            self._senders[sender] = [seq, 1]
            if len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
            return True
        self._senders.move_to_end(sender)
        top, bits = state
        if seq > top:
            shift = seq - top
            state[0] = seq
            state[1] = ((bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            return True
        age = top - seq
        if age >= WINDOW or (bits >> age) & 1:
            return False
        state[1] = bits | (1 << age)
        return True


class PacketSealer:
    """The IO edge of the keyring: draws nonces and a sender id from the OS,
    counts what it drops. Used by the driver (and by the simulator when
    sealing is on)."""

    def __init__(self, keyring: Keyring, sender_id: bytes | None = None, random_bytes=os.urandom) -> None:
        self.keyring = keyring
        self.sender_id = sender_id if sender_id is not None else random_bytes(8)
        self._random = random_bytes
        self._seq = 0
        self.replay = ReplayWindow()
        self.dropped: dict[str, int] = {}

    def seal(self, payload: bytes) -> bytes:
        self._seq += 1
        return self.keyring.seal(self.sender_id + self._seq.to_bytes(8, "big"), self._random(12), payload)

    def open(self, packet: bytes) -> bytes:
        """Payload of an authentic, fresh packet; raises UnsealError (and counts it)."""
        try:
            sender, seq, payload = self.keyring.open(packet)
        except UnsealError as exc:
            self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
            raise
        if not self.replay.check_and_record(sender, seq):
            self.dropped["replayed"] = self.dropped.get("replayed", 0) + 1
            raise UnsealError("replayed gossip packet", "replayed", sender=sender.hex(), seq=seq)
        return payload
