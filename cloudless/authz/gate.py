"""The authorize hook a node's RPC servers run before every call."""

from __future__ import annotations

from typing import Any

from cloudless.authz.proof import ProofVerifier
from cloudless.authz.roles import Principal, principal_of
from cloudless.authz.table import FORWARD_PREFIX, Authorizer


class CallGate:
    """`RpcServer(authorize=CallGate(...))`: returns the principal a call acts for, or refuses it.

    A direct call acts for its verified peer. `fwd.<method>` (only nodes may
    send it) acts for the client whose proof it carries, or, with no proof,
    for the forwarding node itself; either way against `<method>`'s rule.
    """

    def __init__(self, proofs: ProofVerifier, authorizer: Authorizer | None = None) -> None:
        self.authorizer = authorizer or Authorizer()
        self.proofs = proofs

    def __call__(self, peer: Any, method: str, body: bytes, proof: bytes) -> Principal:
        caller = principal_of(peer)
        self.authorizer.check_caller(caller, method)
        if not method.startswith(FORWARD_PREFIX):
            return caller
        inner = method[len(FORWARD_PREFIX) :]
        original = self.proofs.verify(proof, inner, body) if proof else caller
        self.authorizer.check_forwarded(original, inner)
        return original
