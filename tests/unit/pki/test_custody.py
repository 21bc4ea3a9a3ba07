import pytest

from cloudless.pki.custody import load_kek, new_kek, open_ca_key, save_kek, seal_ca_key
from cloudless.pki.errors import InvalidCredentials

KEY = b"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n"


def test_sealed_ca_key_opens_only_with_its_kek_cluster_and_ca(tmp_path) -> None:
    kek = new_kek()
    sealed = seal_ca_key(kek, KEY, "c1", "sha256:aa")
    assert KEY not in sealed and b"secret" not in sealed
    assert open_ca_key(kek, sealed, "c1", "sha256:aa") == KEY
    with pytest.raises(InvalidCredentials):
        open_ca_key(new_kek(), sealed, "c1", "sha256:aa")
    with pytest.raises(InvalidCredentials):
        open_ca_key(kek, sealed, "c2", "sha256:aa")  # swapped into another cluster
    with pytest.raises(InvalidCredentials):
        open_ca_key(kek, sealed, "c1", "sha256:bb")  # under another CA certificate
    with pytest.raises(InvalidCredentials):
        open_ca_key(kek, sealed[:-1] + bytes([sealed[-1] ^ 1]), "c1", "sha256:aa")
    with pytest.raises(InvalidCredentials):
        open_ca_key(kek, b"\x01short", "c1", "sha256:aa")
    assert seal_ca_key(kek, KEY, "c1", "sha256:aa") != sealed  # fresh nonce each time


def test_kek_file_is_private_and_checked(tmp_path) -> None:
    assert load_kek(tmp_path) is None  # not a coordinator
    kek = new_kek()
    save_kek(tmp_path, kek)
    assert load_kek(tmp_path) == kek
    assert (tmp_path / "ca.kek").stat().st_mode & 0o777 == 0o600
    (tmp_path / "ca.kek").write_bytes(b"short")
    with pytest.raises(InvalidCredentials):
        load_kek(tmp_path)
    with pytest.raises(InvalidCredentials):
        save_kek(tmp_path, b"short")
