"""Gossip a keyholder alone cannot forge (issue 13), with real `cloudless
node` processes: a process holding the cluster gossip keyring, but not
node2's key, cannot make node2 leave or pin it dead; removing a node rotates
the gossip key so the removed node's copy no longer opens or injects."""

from __future__ import annotations

import socket

import msgspec
import pytest
import trio

from cloudless.gossip import messages as wire
from cloudless.gossip.claims import CLAIM_LEFT, claim_bytes, ecdsa_signer
from cloudless.gossip.keyring import Keyring, PacketSealer, UnsealError
from cloudless.gossip.messages import MAX_INCARNATION, Alive, Dead
from cloudless.gossip.metadata import EMPTY_METADATA
from cloudless.node.enroll import enroll
from cloudless.pki.credentials import Credentials
from tests.harness.node_cluster import NodeProcess, bootstrap, cli, cli_json, free_port, join, status, token, wait_for


@pytest.fixture
def nodes(tmp_path):
    started: list[NodeProcess] = []

    def make(name: str) -> NodeProcess:
        node = NodeProcess(tmp_path / name, free_port(), name)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


def three_nodes(nodes) -> tuple[list[NodeProcess], object]:
    first = nodes("node1")
    config = bootstrap(first)
    others = [nodes("node2"), nodes("node3")]
    join(config, first, *others)
    wait_for(lambda: len(status(config)["voters"]) == 3, 90, "three voters")
    wait_for(lambda: all_alive(config, "node1", "node2", "node3"), 30, "every member alive")
    return [first, *others], config


def member_state(config, name: str) -> str | None:
    for member in status(config)["members"]:
        if member["id"] == name:
            return member["state"]
    return None


def all_alive(config, *names: str) -> bool:
    return all(member_state(config, n) == "alive" for n in names)


def membership_events(config, kind: str | None = None) -> set[str]:
    """Members named in the node's membership events (of `kind`, if given)."""
    items = cli_json("events", "--last", "10000", config=config)["items"]
    return {e["node"] for e in items if e["kind"].startswith("member.") and (kind is None or e["kind"] == kind)}


def gossip_keys(node: NodeProcess) -> list[bytes]:
    return msgspec.msgpack.decode((node.data_dir / "gossip.keys").read_bytes(), type=list[bytes])


def send(keyring: list[bytes], target: NodeProcess, *messages) -> None:
    """One sealed gossip datagram, as any holder of `keyring` can make."""
    sealer = PacketSealer(Keyring(keyring[0], keyring[1:]))
    packet = sealer.seal(wire.pack([wire.encode(m) for m in messages]))
    host, port = target.address.split(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(packet, (host, int(port)))


def ghost(name: str) -> Alive:
    # A name the cluster never registered: accepted as a join, which shows the
    # packet around it was opened and read.
    return Alive(0, name, f"127.0.0.1:{free_port()}", 0, EMPTY_METADATA)


def test_forged_leave_and_max_incarnation_death_cannot_evict_a_member(nodes):
    (node1, _node2, node3), config = three_nodes(nodes)
    keyring = gossip_keys(node3)  # what every member (and a stolen one) holds
    node3_key = Credentials.load(node3.data_dir / "tls").private_key
    cluster_id = Credentials.load(node3.data_dir / "tls").identity.cluster_id
    # node3's own key signs a "node2 left": a valid signature, by the wrong member.
    signed_by_node3 = ecdsa_signer(node3_key)(claim_bytes(cluster_id, "node2", 7, CLAIM_LEFT, 0, "", None))
    forged = [
        Dead(MAX_INCARNATION, "node2", "node2"),
        Dead(7, "node2", "node2", signed_by_node3),
        ghost("ghost-a"),  # after the forgeries, in the same datagram
    ]
    for _ in range(3):
        send(keyring, node1, *forged)
    wait_for(lambda: member_state(config, "ghost-a") is not None, 30, "node1 to read the forged datagram")
    assert member_state(config, "node2") == "alive"
    # Not even for a moment (node2 would refute a leave it hears of, but by then
    # the controller may have acted on it): node1 never recorded one.
    assert "ghost-a" in membership_events(config)
    assert "node2" not in membership_events(config, "member.left")

    # A keyholder's death observation at the largest incarnation there is:
    # node1 takes it as an observation about node2's signed incarnation, and
    # node2's signed refutation brings it back, every time.
    for round_ in range(2):
        send(keyring, node1, Dead(MAX_INCARNATION, "node2", "node3"), ghost(f"ghost-b{round_}"))
        wait_for(lambda r=round_: member_state(config, f"ghost-b{r}") is not None, 30, "the death to be read")
        wait_for(lambda: member_state(config, "node2") == "alive", 30, "node2's refutation")
    assert cli("vars", "put", "still", "working", config=config).returncode == 0


def test_removing_a_node_rotates_the_gossip_key(nodes, monkeypatch):
    monkeypatch.setenv("CLOUDLESS_GOSSIP_KEY_OVERLAP", "3")  # the old key's grace, shortened for the test
    (node1, node2, node3), config = three_nodes(nodes)
    stale = gossip_keys(node3)
    assert stale == gossip_keys(node1)
    cli("nodes", "rm", "node3", config=config, check=True)

    def rotated_and_dropped(node: NodeProcess) -> list[bytes] | None:
        keys = gossip_keys(node)
        return keys if len(keys) == 1 and keys[0] not in stale else None

    current = wait_for(lambda: rotated_and_dropped(node1), 60, "node1 to rotate and drop the old key")
    assert wait_for(lambda: rotated_and_dropped(node2), 30, "node2 to follow") == current
    # The removed node never received the new key.
    assert current[0] not in gossip_keys(node3)

    # The stale key no longer opens current packets...
    sealed_now = PacketSealer(Keyring(current[0])).seal(b"current")
    with pytest.raises(UnsealError):
        PacketSealer(Keyring(stale[0], stale[1:])).open(sealed_now)
    # ...and what it seals no longer gets in, while the current key does.
    send(stale, node1, ghost("ghost-stale"))
    send(current, node1, ghost("ghost-current"))
    wait_for(lambda: member_state(config, "ghost-current") is not None, 30, "the current key's packet to be read")
    assert member_state(config, "ghost-stale") is None
    assert all_alive(config, "node1", "node2")


def test_only_nodes_receive_the_gossip_keyring_at_enrollment(nodes):
    first = nodes("node1")
    config = bootstrap(first)
    host, port = first.address.split(":")

    async def enroll_as(role: str, name: str):
        advertise = f"127.0.0.1:{free_port()}" if role == "node" else ""  # registered, never started
        _, reply = await enroll(
            (host, int(port)), token(config, "--role", role), name=name, role=role, advertise=advertise
        )
        return reply.gossip_keys

    assert trio.run(enroll_as, "operator", "olga") == []
    assert trio.run(enroll_as, "node", "nina") == gossip_keys(first)
