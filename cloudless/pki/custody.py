"""Custody of the cluster CA's private key.

The CA key is replicated through Raft so that any coordinator can sign, but
only *sealed*: AES-256-GCM under a key-encryption key (KEK) that never
enters Raft. The KEK lives in the data dir of the nodes an admin trusts to
coordinate (the bootstrap node, and nodes enrolled with `token create
--trust coordinator`, which receive it over the enrollment TLS channel), so
a device's disk, Raft log or snapshot holds only ciphertext, and a stolen
phone cannot sign a certificate. Sealing binds the cluster id and the CA
certificate's fingerprint as associated data, so a sealed key cannot be
swapped in under another CA.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloudless.durable import write_atomic
from cloudless.pki.errors import InvalidCredentials

KEK_FILE = "ca.kek"
KEK_BYTES = 32
NONCE_BYTES = 12
SEAL_VERSION = b"\x01"


def new_kek() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _aad(cluster_id: str, ca_fingerprint: str) -> bytes:
    return b"cloudless-ca-key-v1\x00" + cluster_id.encode() + b"\x00" + ca_fingerprint.encode()


def seal_ca_key(kek: bytes, key_pem: bytes, cluster_id: str, ca_fingerprint: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return SEAL_VERSION + nonce + AESGCM(kek).encrypt(nonce, key_pem, _aad(cluster_id, ca_fingerprint))


def open_ca_key(kek: bytes, sealed: bytes, cluster_id: str, ca_fingerprint: str) -> bytes:
    if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[:1] != SEAL_VERSION:
        raise InvalidCredentials("sealed CA key is malformed")
    nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
    try:
        return AESGCM(kek).decrypt(nonce, body, _aad(cluster_id, ca_fingerprint))
    except InvalidTag:
        raise InvalidCredentials("the CA key does not open with this node's key-encryption key") from None


def save_kek(directory: Path, kek: bytes) -> None:
    if len(kek) != KEK_BYTES:
        raise InvalidCredentials("a CA key-encryption key is 32 bytes")
    write_atomic(Path(directory) / KEK_FILE, kek)


def load_kek(directory: Path) -> bytes | None:
    """This node's KEK, or None: it is not trusted to coordinate."""
    path = Path(directory) / KEK_FILE
    try:
        kek = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(kek) != KEK_BYTES:
        raise InvalidCredentials(f"{path} is not a 32-byte key")
    return kek
