"""The client API's vocabulary: what the CLI (and any SDK) sends to a node.

Every request is validated on decode (msgspec bounds), so a bad request is
refused with InvalidInput before any handler runs.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from cloudless.observability.events import Event as Event  # the events RPC streams these
from cloudless.state.commands import Index, VarKey
from cloudless.state.commands import VarValue as VarText

Ttl = Annotated[float, msgspec.Meta(gt=0, le=30 * 24 * 3600)]


class VarsGet(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: VarKey
    stale: bool = False  # opt-in: read this node's copy without ReadIndex


class VarsPut(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: VarKey
    value: VarText
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    seq: Index = 0


class VarsCas(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: VarKey
    value: VarText
    index: Index
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    seq: Index = 0


class VarsRm(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: VarKey
    index: Index | None = None
    client_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    seq: Index = 0


class VarsList(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prefix: Annotated[str, msgspec.Meta(max_length=256)] = ""
    stale: bool = False


class VarValue(msgspec.Struct, frozen=True):
    key: str
    value: str
    index: int


class VarItems(msgspec.Struct, frozen=True):
    items: list[VarValue]
    index: int  # the state's applied index the listing reflects


class Deleted(msgspec.Struct, frozen=True):
    key: str
    index: int


class StatusRequest(msgspec.Struct, frozen=True):
    pass


class MemberInfo(msgspec.Struct, frozen=True):
    id: str
    name: str
    address: str
    state: str  # alive | suspect | dead | left
    role: str  # voter | learner | none
    region: str
    zone: str
    power: str = "ac"
    battery_pct: float | None = None
    network: str = "wired"
    runtime: str = ""  # runc | rootless | memory | none; "" when the node has not said


class StatusReply(msgspec.Struct, frozen=True):
    cluster_id: str
    leader: str
    term: int
    commit_index: int
    voters: list[str]
    learners: list[str]
    members: list[MemberInfo]
    node: str = ""  # the node that answered


class TokenCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ttl_s: Ttl = 900.0
    uses: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    role: Annotated[str, msgspec.Meta(pattern=r"^(node|admin|operator|viewer)$")] = "node"
    trust: Annotated[str, msgspec.Meta(pattern=r"^(|coordinator)$")] = ""


class TokenReply(msgspec.Struct, frozen=True):
    token: str
    id: str
    role: str
    expires_at: float
    uses: int


class NodeRemove(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node_id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]


class EventsFollow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    follow: bool = False
    last: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 100
