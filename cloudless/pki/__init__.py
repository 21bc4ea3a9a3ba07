"""Cluster PKI: the CA, node/client credentials, revocation, peer verification
and bootstrap tokens. See ARCHITECTURE.md ("PKI") for how the pieces meet."""
