"""The node is built complete before it runs: `node/` constructs every
subsystem and connects them through ports, and nothing is left `None` for
`run()` to fill in."""

from __future__ import annotations

from cloudless.node.datadir import DataDir
from cloudless.node.process import Node, NodeOptions, establish_identity
from cloudless.observability.events import EventLog


async def test_a_bootstrapped_node_is_complete_once_constructed(tmp_path):
    options = NodeOptions(data_dir=tmp_path, listen=("127.0.0.1", 17999), zone="z1", labels={"rack": "a"})
    events = EventLog()
    await establish_identity(options, DataDir(tmp_path), events)
    assert [e.kind for e in events.last(10)] == ["cluster.bootstrapped"]

    node = Node(options, events)
    try:
        missing = sorted(name for name, value in vars(node).items() if value is None)
        assert missing == []
        assert node.membership.node_id == node.node_id
        assert node.membership.cluster_id == node.cluster_id and node.cluster_id.startswith("c-")
        # Its own gossip entry carries the metadata the node computes: its zone, labels, Raft role.
        own = node.membership.member(node.node_id)
        assert own is not None and own.meta.zone == "z1" and own.meta.labels["rack"] == "a"
        assert "voter" in node.metadata().roles  # the bootstrap log makes it the only voter
        assert node.address_of(node.node_id) == ("127.0.0.1", 17999)
    finally:
        node.close()


async def test_a_restarted_node_keeps_its_identity_and_builds_again(tmp_path):
    options = NodeOptions(data_dir=tmp_path, listen=("127.0.0.1", 17998))
    await establish_identity(options, DataDir(tmp_path), EventLog())
    first = Node(options)
    first.close()
    again = EventLog()
    await establish_identity(options, DataDir(tmp_path), again)
    assert again.last(10) == []  # enrolled already: nothing to do
    second = Node(options)
    try:
        assert (second.node_id, second.cluster_id) == (first.node_id, first.cluster_id)
    finally:
        second.close()
