"""Serving the gateway: hypercorn under trio, TLS only, and the gateway's certificate.

The node's own certificate names it by SPIFFE URI only; S3 clients check the
host name, so the gateway gets a certificate from the cluster CA with DNS/IP
SANs for the names it is reached by. Clients pass the cluster CA as their
trust root (boto3 `verify=<ca file>`, aws cli `--ca-bundle`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypercorn.config import Config
from hypercorn.trio import serve

from cloudless.durable import write_atomic
from cloudless.pki.ca import BACKDATE, ClusterCA

if TYPE_CHECKING:
    from cloudless.blobs.s3.app import S3Gateway

log = logging.getLogger(__name__)

GATEWAY_CERT_LIFETIME = timedelta(days=30)


def issue_gateway_certificate(
    ca: ClusterCA, hosts: Sequence[str], now: datetime, lifetime: timedelta = GATEWAY_CERT_LIFETIME
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for a TLS server reachable as `hosts` (names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Cloudless S3 gateway {ca.cluster_id}")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + lifetime, ca.not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def serve_gateway(
    app: S3Gateway,
    *,
    host: str,
    port: int,
    certfile: Path,
    keyfile: Path,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` over HTTPS until cancelled; `task_status.started(bound addresses)`."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.certfile = str(certfile)
    config.keyfile = str(keyfile)
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 2
    # No socket read_timeout: hypercorn applies it while a long GET streams out (the client
    # sends nothing then) and would cut the download; the app times out stalled uploads itself.
    config.ssl_handshake_timeout = 15
    await serve(app, config, task_status=task_status)


def gateway_tls_files(directory: Path, hosts: Sequence[str]) -> tuple[Path, Path, Path]:
    """(cert, key, CA cert) for a stand-alone gateway: a local CA made once in `directory`,
    and a server certificate for `hosts` re-issued on each start."""

    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca.key"
    now = datetime.now(UTC)
    if ca_cert.exists() and ca_key.exists():
        ca = ClusterCA.from_pem(ca_cert.read_bytes(), ca_key.read_bytes())
    else:
        ca = ClusterCA.create("s3-gateway", now)
        cert_pem, key_pem = ca.to_pem()
        write_atomic(ca_key, key_pem)
        write_atomic(ca_cert, cert_pem, mode=0o644)
    cert_pem, key_pem = issue_gateway_certificate(ca, hosts, now)
    write_atomic(directory / "gateway.key", key_pem)
    write_atomic(directory / "gateway.pem", cert_pem, mode=0o644)
    return directory / "gateway.pem", directory / "gateway.key", ca_cert
