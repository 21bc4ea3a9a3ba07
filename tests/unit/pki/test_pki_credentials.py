import base64
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.pki.ca import ClusterCA
from cloudless.pki.credentials import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    Credentials,
    issue_credentials,
    make_csr,
    new_private_key,
    private_key_pem,
)
from cloudless.pki.errors import InvalidCredentials
from cloudless.pki.identity import Identity

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca():
    return ClusterCA.create("c1", NOW)


@pytest.fixture(scope="module")
def creds(ca):
    return issue_credentials(ca, Identity.node("c1", "n1"), NOW)


def test_issued_credentials_expose_identity_serial_and_window(ca, creds):
    assert creds.identity == Identity.node("c1", "n1")
    assert creds.serial == creds.certificate.serial_number
    assert creds.ca_certificate == ca.certificate
    assert creds.not_after - NOW == timedelta(hours=24)
    assert creds.not_before < NOW


def test_save_load_round_trip_with_owner_only_key(tmp_path, creds):
    creds.save(tmp_path / "tls")
    loaded = Credentials.load(tmp_path / "tls")
    assert loaded == creds
    assert loaded.identity == creds.identity
    key_mode = stat.S_IMODE(os.stat(tmp_path / "tls" / KEY_FILE).st_mode)
    assert key_mode & 0o077 == 0, oct(key_mode)
    assert Credentials.exist(tmp_path / "tls")


def test_save_over_existing_set_replaces_all_three_files_together(tmp_path, ca, creds):
    creds.save(tmp_path)
    renewed = issue_credentials(ca, Identity.node("c1", "n1"), NOW + timedelta(hours=16))
    renewed.save(tmp_path)
    assert Credentials.load(tmp_path) == renewed
    # The old generation is gone; the fixed names still resolve.
    generations = [p for p in tmp_path.iterdir() if p.name.startswith("gen-")]
    assert len(generations) == 1
    for name in (CA_FILE, CERT_FILE, KEY_FILE):
        assert (tmp_path / name).read_bytes()


def test_crash_before_the_swap_leaves_the_previous_set_loadable(tmp_path, ca, creds):
    creds.save(tmp_path)
    # A half-written generation (crash mid-save) is ignored until `current` points at it.
    partial = tmp_path / "gen-deadbeefdeadbeef"
    partial.mkdir()
    other = issue_credentials(ca, Identity.node("c1", "n2"), NOW)
    (partial / CERT_FILE).write_bytes(other.cert_pem)
    assert Credentials.load(tmp_path) == creds


def test_load_of_empty_directory_names_missing_file(tmp_path):
    with pytest.raises(InvalidCredentials, match="missing"):
        Credentials.load(tmp_path)
    assert not Credentials.exist(tmp_path)


def test_key_that_does_not_match_certificate_is_refused(creds):
    with pytest.raises(InvalidCredentials, match="does not match"):
        Credentials(creds.ca_pem, creds.cert_pem, private_key_pem(new_private_key()))


def test_garbage_pem_is_refused(creds):
    with pytest.raises(InvalidCredentials):
        Credentials(creds.ca_pem, b"not a certificate", creds.key_pem)
    with pytest.raises(InvalidCredentials):
        Credentials(creds.ca_pem, creds.cert_pem, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_renewal_is_due_from_two_thirds_of_the_lifetime(ca):
    creds = issue_credentials(ca, Identity.node("c1", "n1"), NOW, timedelta(hours=24))
    lifetime = creds.not_after - creds.not_before
    two_thirds = creds.not_before + lifetime * 2 / 3
    assert not creds.needs_renewal(NOW)
    assert not creds.needs_renewal(two_thirds - timedelta(seconds=1))
    assert creds.needs_renewal(two_thirds)
    assert creds.needs_renewal(creds.not_after + timedelta(days=1))
    assert creds.renew_at == two_thirds


def test_with_certificate_keeps_key_and_ca(ca, creds):
    identity = creds.identity
    renewed_cert = ca.issue(make_csr(creds.private_key, identity), identity, NOW + timedelta(hours=17))
    renewed = creds.with_certificate(renewed_cert.public_bytes(serialization.Encoding.PEM))
    assert renewed.key_pem == creds.key_pem
    assert renewed.serial != creds.serial
    assert not renewed.needs_renewal(NOW + timedelta(hours=17))


# Mutations can produce a non-positive serial, which cryptography still parses with a warning.
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_certificate_pem_loads_or_raises_invalid_credentials(creds, data):
    der = bytearray(creds.certificate.public_bytes(serialization.Encoding.DER))
    position = data.draw(st.integers(0, len(der) - 1))
    der[position] ^= data.draw(st.integers(1, 255))
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der)) + b"-----END CERTIFICATE-----\n"
    try:
        loaded = Credentials(creds.ca_pem, pem, creds.key_pem)
    except InvalidCredentials:
        return
    assert loaded.certificate.public_key() == creds.certificate.public_key()


def test_certificate_not_issued_by_the_stored_ca_is_refused(creds):
    other_ca = ClusterCA.create("c1", NOW)
    with pytest.raises(InvalidCredentials, match="not issued by the CA"):
        Credentials(other_ca.certificate_pem, creds.cert_pem, creds.key_pem)


def test_repr_never_shows_the_private_key(creds):
    assert b"PRIVATE KEY".decode() not in repr(creds)
