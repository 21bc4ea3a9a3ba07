"""The CA key never rests in plaintext anywhere it is replicated, and only
nodes trusted to coordinate can open it (issue: zero trust, CA custody)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rocksdict import AccessType, Options, Rdict

from tests.harness.node_cluster import NodeProcess, bootstrap, cli, free_port, status, token, wait_for

PEM_KEY = re.compile(
    rb"-----BEGIN (?:EC |ENCRYPTED )?PRIVATE KEY-----.+?-----END (?:EC |ENCRYPTED )?PRIVATE KEY-----", re.S
)


def _rocks_values(path: Path) -> list[bytes]:
    """Every key and value of every column family of the RocksDB at `path` (read-only)."""
    out: list[bytes] = []
    try:
        families = Rdict.list_cf(str(path))
    except Exception:
        return out
    options = Options(raw_mode=True)
    db = Rdict(
        str(path),
        options=options,
        column_families={name: Options(raw_mode=True) for name in families},
        access_type=AccessType.read_only(),
    )
    try:
        for name in families:
            cf = db.get_column_family(name)
            for key, value in cf.items():
                out += [bytes(key), bytes(value)]
    finally:
        db.close()
    return out


def _private_keys_in(blob: bytes) -> list[bytes]:
    return PEM_KEY.findall(blob)


def _public_numbers(pem: bytes):
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        return None
    return key.public_key().public_numbers()


@pytest.fixture
def nodes(tmp_path):
    started: list[NodeProcess] = []

    def make(name: str) -> NodeProcess:
        node = NodeProcess(tmp_path / name, free_port(), name)
        started.append(node)
        return node

    yield make
    for node in reversed(started):
        node.stop()


def test_no_data_dir_holds_the_ca_key_in_plaintext_and_devices_get_no_key_encryption_key(nodes) -> None:
    first = nodes("node1")
    config = bootstrap(first)
    device = nodes("phone")
    device.start("--join", first.address, "--token", token(config))  # a plain (device) token
    coordinator = nodes("vps")
    coordinator.start("--join", first.address, "--token", token(config, "--trust", "coordinator"))
    wait_for(
        lambda: {m["id"] for m in status(config)["members"] if m["state"] == "alive"} >= {"node1", "phone", "vps"},
        60,
        "all three alive",
    )
    # The coordinator got the key-encryption key at enrollment; the device did not.
    assert (coordinator.data_dir / "ca.kek").exists()
    assert not (device.data_dir / "ca.kek").exists()
    # Both replicate the log (the device at most as a learner), so both hold the sealed CA key...
    wait_for(lambda: cli("vars", "put", "probe", "1", config=config).returncode == 0, 30, "a write")
    # ...but the device is never given a vote, whatever its score.
    assert "phone" not in status(config)["voters"]

    ca_cert = x509.load_pem_x509_certificate((first.data_dir / "tls" / "ca.pem").read_bytes())
    ca_public = ca_cert.public_key().public_numbers()
    for node in (device, coordinator, first):
        node.stop()
    found_keys = 0
    for node in (first, device, coordinator):
        for path in sorted(node.data_dir.rglob("*")):
            if path.is_file():
                for pem in _private_keys_in(path.read_bytes()):
                    found_keys += 1
                    assert _public_numbers(pem) != ca_public, f"plaintext CA key in {path}"
            if path.is_dir() and (path / "CURRENT").exists():  # a RocksDB
                for value in _rocks_values(path):
                    for pem in _private_keys_in(value):
                        found_keys += 1
                        assert _public_numbers(pem) != ca_public, f"plaintext CA key in RocksDB {path}"
    # The scan saw keys (each node's own, the admin's): it would have seen the CA's.
    assert found_keys >= 3
