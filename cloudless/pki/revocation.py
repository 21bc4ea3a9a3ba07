"""Revoked certificate serials, consulted by every handshake.

Certificates are short-lived, so the list only needs to hold a serial until
the certificate it names would have expired anyway; `prune` drops the rest.
The coordinator keeps the authoritative list in Raft and nodes install copies;
`generation` lets a holder tell cheaply whether its copy changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

import msgspec

from cloudless.pki.clock import as_utc
from cloudless.pki.errors import InvalidRevocationList

FORMAT_VERSION = 1
# RFC 5280 §4.1.2.2: serials are positive and at most 20 octets.
MAX_SERIAL = (1 << 160) - 1
MAX_ENTRIES = 1_000_000

SerialBytes = Annotated[bytes, msgspec.Meta(min_length=1, max_length=20)]


class RevokedSerial(msgspec.Struct, frozen=True, array_like=True):
    # bytes, not int: msgpack integers stop at 64 bits and serials are 159.
    serial: SerialBytes
    not_after: datetime


class RevocationRecord(msgspec.Struct, frozen=True):
    version: Annotated[int, msgspec.Meta(ge=1)]
    generation: Annotated[int, msgspec.Meta(ge=0)]
    entries: Annotated[list[RevokedSerial], msgspec.Meta(max_length=MAX_ENTRIES)]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RevocationRecord)


def _check_serial(serial: int) -> int:
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 < serial <= MAX_SERIAL:
        raise ValueError(f"certificate serial must be a positive integer of at most 20 octets, got {serial!r}")
    return serial


class RevocationList:
    def __init__(self) -> None:
        self._entries: dict[int, datetime] = {}
        self.generation = 0

    def add(self, serial: int, not_after: datetime) -> bool:
        """Revoke `serial` until `not_after` (its certificate's expiry); False if already revoked."""
        serial = _check_serial(serial)
        not_after = as_utc(not_after, "not_after")
        if self._entries.get(serial) == not_after:
            return False
        self._entries[serial] = not_after
        self.generation += 1
        return True

    def install(self, other: RevocationList) -> bool:
        """Take `other`'s entries and generation in place, so verifiers holding this
        list see them at their next handshake; False if the generation is unchanged."""
        if other is self or (other.generation == self.generation and other._entries == self._entries):
            return False
        self._entries = dict(other._entries)
        self.generation = other.generation
        return True

    def is_revoked(self, serial: int) -> bool:
        return serial in self._entries

    def prune(self, now: datetime) -> int:
        """Forget serials whose certificates have expired; returns how many."""
        now = as_utc(now)
        expired = [serial for serial, not_after in self._entries.items() if not_after < now]
        for serial in expired:
            del self._entries[serial]
        if expired:
            self.generation += 1
        return len(expired)

    def __contains__(self, serial: object) -> bool:
        return serial in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[int, datetime]]:
        return iter(sorted(self._entries.items()))

    def to_bytes(self) -> bytes:
        entries = [
            RevokedSerial(serial.to_bytes((serial.bit_length() + 7) // 8, "big"), not_after)
            for serial, not_after in sorted(self._entries.items())
        ]
        return _encoder.encode(RevocationRecord(FORMAT_VERSION, self.generation, entries))

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        try:
            record = _decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise InvalidRevocationList(f"revocation list does not validate: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise InvalidRevocationList(f"revocation list does not decode: {exc}") from exc
        if record.version != FORMAT_VERSION:
            raise InvalidRevocationList(f"unsupported revocation list format version {record.version}")
        revocations = cls()
        for entry in record.entries:
            serial = int.from_bytes(entry.serial, "big")
            if serial == 0:
                raise InvalidRevocationList("revocation list holds serial 0")
            if entry.not_after.tzinfo is None:
                raise InvalidRevocationList("revocation list holds a naive expiry time")
            revocations._entries[serial] = as_utc(entry.not_after, "not_after")
        revocations.generation = record.generation
        return revocations
