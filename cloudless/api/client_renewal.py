"""A client keeps its context's trust bundle and certificate current.

After a command, the CLI asks the node it talked to for the cluster's CA
bundle (`pki.bundle`). During a CA rotation that bundle holds a CA the
context does not trust yet; it is accepted only with the endorsement of a
CA the context already trusts (`pki.bundle.accept_offered_bundle`). Once the
new CA is active, or when the certificate is two-thirds through its life,
the client re-issues its own certificate (`pki.renew_client`: same identity
and role, a new key made here). Either change is written back into the
client config (locked, atomic, 0600), only if nobody changed that context
meanwhile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from cloudless.api import client_config
from cloudless.api.ca import CABundle, ClientRenew, ClientRenewed
from cloudless.api.client import ClusterClient
from cloudless.pki.bundle import accept_offered_bundle
from cloudless.pki.credentials import Credentials, make_csr, new_private_key, private_key_pem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refreshed:
    trust_changed: bool
    renewed: bool
    credentials: Credentials


async def refresh_credentials(client: ClusterClient, *, force_renew: bool = False) -> Refreshed:
    """The context's credentials after learning the bundle and, if due, re-issuing (nothing saved)."""
    context = client.context
    current = Credentials(context.ca_pem, context.certificate_pem, context.key_pem)
    offered = await client.call("pki.bundle", b"", response=CABundle)
    trusted = current
    if offered.ca_pem and offered.ca_pem != current.ca_pem:
        bundle = accept_offered_bundle(current.ca_pem, offered.ca_pem, context.cluster_id, offered.endorsement)
        trusted = current.with_bundle(bundle)
    due = not trusted.issued_by_active_ca or trusted.needs_renewal(datetime.now(UTC))
    if not (due or force_renew):
        return Refreshed(trusted is not current, False, trusted)
    key = new_private_key()
    csr = make_csr(key, trusted.identity)
    lifetime = (trusted.not_after - trusted.not_before).total_seconds()
    reply = await client.call(
        "pki.renew_client",
        ClientRenew(csr.public_bytes(serialization.Encoding.PEM), ttl_s=max(60.0, min(lifetime, 366 * 86400.0))),
        response=ClientRenewed,
    )
    # The reply's bundle comes from the leader; it must still pass the same endorsement check.
    bundle = accept_offered_bundle(trusted.ca_pem, reply.ca_pem, context.cluster_id, offered.endorsement)
    renewed = Credentials(bundle, reply.cert_pem, private_key_pem(key))
    if renewed.identity != trusted.identity:
        raise client_config.ConfigError(f"the cluster re-issued {renewed.identity}, not {trusted.identity}")
    return Refreshed(True, True, renewed)


def save_refreshed(path: Path, context_name: str, before: client_config.Context, fresh: Credentials) -> bool:
    """Write `fresh` into the context; False (nothing written) if the context changed meanwhile."""
    with client_config.editing(path) as config:
        context = config.contexts.get(context_name)
        if context is None or context.certificate_pem != before.certificate_pem or context.ca_pem != before.ca_pem:
            return False
        context.ca_pem, context.certificate_pem, context.key_pem = fresh.ca_pem, fresh.cert_pem, fresh.key_pem
    return True
