"""SWIM + Lifeguard gossip membership.

`core.GossipCore` is the sans-IO protocol; `driver.GossipDriver` runs it on
the node's UDP socket under trio; `keyring` seals packets with AES-256-GCM;
`cloudless.testing.gossip_sim` runs thousands of cores in virtual time.
"""

from cloudless.gossip.core import GossipConfig, GossipCore
from cloudless.gossip.events import (
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberSuspect,
    MemberUpdated,
    PushPull,
    StreamProbe,
)
from cloudless.gossip.members import MemberState
from cloudless.gossip.metadata import Metadata, Resources

__all__ = [
    "GossipConfig",
    "GossipCore",
    "MemberAlive",
    "MemberDead",
    "MemberJoined",
    "MemberLeft",
    "MemberState",
    "MemberSuspect",
    "MemberUpdated",
    "Metadata",
    "PushPull",
    "Resources",
    "StreamProbe",
]
