"""Who may do what: roles, principals and the permission table.

Every RPC method a node serves is listed in `authz.table.PERMISSIONS` with
the roles that may call it; a method that is not listed is refused (default
deny), and a test checks that every registered method is listed. Handlers
still check what only they can know (a node may report only its *own*
allocations); this layer answers "may this kind of caller use this method at
all", before the request body is even decoded.
"""

from cloudless.authz.gate import CallGate
from cloudless.authz.proof import ProofSigner, ProofVerifier
from cloudless.authz.roles import (
    CLIENT_ROLES,
    ROLES,
    Principal,
    Role,
    principal_of,
)
from cloudless.authz.table import PERMISSIONS, Authorizer, PermissionDenied, Rule, is_listed

__all__ = [
    "CLIENT_ROLES",
    "PERMISSIONS",
    "ROLES",
    "Authorizer",
    "CallGate",
    "PermissionDenied",
    "Principal",
    "ProofSigner",
    "ProofVerifier",
    "Role",
    "Rule",
    "is_listed",
    "principal_of",
]
