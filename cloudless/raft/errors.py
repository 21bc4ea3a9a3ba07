"""Errors of a node's replicated state as its callers see them (routing
decisions depend on which one it is)."""

from __future__ import annotations

from cloudless.errors import Unavailable


class NoLeader(Unavailable):
    pass


class NotAMember(Unavailable):
    """This node is not (any longer) in the leader's configuration.

    A voter removed while it was unreachable never hears of its removal
    (thesis §4.2.2): its own configuration still lists it. The leader says
    so when it asks for a read index, and the node then routes like a
    non-member until its configuration changes again.
    """

    code = "not_member"
