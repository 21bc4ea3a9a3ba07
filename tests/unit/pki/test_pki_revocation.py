from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudless.pki.errors import InvalidRevocationList
from cloudless.pki.revocation import MAX_SERIAL, RevocationList, RevocationRecord

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_add_revokes_and_bumps_generation_once():
    revocations = RevocationList()
    assert revocations.add(7, NOW + timedelta(hours=1))
    assert revocations.is_revoked(7) and not revocations.is_revoked(8)
    assert revocations.generation == 1
    assert not revocations.add(7, NOW + timedelta(hours=1))
    assert revocations.generation == 1


def test_prune_drops_only_serials_whose_certificates_expired():
    revocations = RevocationList()
    revocations.add(1, NOW - timedelta(seconds=1))
    revocations.add(2, NOW + timedelta(seconds=1))
    generation = revocations.generation
    assert revocations.prune(NOW) == 1
    assert not revocations.is_revoked(1) and revocations.is_revoked(2)
    assert revocations.generation == generation + 1
    assert revocations.prune(NOW) == 0
    assert revocations.generation == generation + 1


@pytest.mark.parametrize("serial", [0, -1, MAX_SERIAL + 1, True, "5"])
def test_invalid_serials_are_refused(serial):
    with pytest.raises(ValueError):
        RevocationList().add(serial, NOW)


@given(st.dictionaries(st.integers(1, MAX_SERIAL), st.integers(0, 10**6), max_size=20))
def test_bytes_round_trip_keeps_serials_expiries_and_generation(entries):
    revocations = RevocationList()
    for serial, seconds in entries.items():
        revocations.add(serial, NOW + timedelta(seconds=seconds))
    restored = RevocationList.from_bytes(revocations.to_bytes())
    assert list(restored) == list(revocations)
    assert restored.generation == revocations.generation


def test_unknown_format_version_is_refused():
    data = msgspec.msgpack.encode(RevocationRecord(version=2, generation=0, entries=[]))
    with pytest.raises(InvalidRevocationList, match="version"):
        RevocationList.from_bytes(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_invalid_revocation_list(data):
    try:
        RevocationList.from_bytes(data)
    except InvalidRevocationList:
        pass


def test_install_replaces_contents_in_place_for_holders_of_the_list():
    held = RevocationList()
    held.add(1, NOW)
    update = RevocationList()
    update.add(2, NOW)
    update.add(3, NOW)
    assert held.install(update)
    assert not held.is_revoked(1) and held.is_revoked(2) and held.is_revoked(3)
    assert held.generation == update.generation
    assert not held.install(RevocationList.from_bytes(update.to_bytes()))
    update.add(4, NOW)
    assert not held.is_revoked(4)
