"""The node's own copy of its allocations, so that after a reboot with no
coordinator reachable the agent restarts what it last knew it should run
(disconnected mode).

One file, replaced atomically: written to a temporary file, fsynced, renamed
over the old one, and the directory fsynced — a crash leaves the old set or
the new one, never a torn one. An unreadable file is reported and treated as
empty (the cluster sends the truth on reconnection).
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from cloudless.agent.messages import NodeAllocations
from cloudless.durable import write_atomic

log = logging.getLogger(__name__)

FILE_NAME = "allocations.msgpack"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(NodeAllocations)


class LocalAllocations:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME

    def load(self, node: str) -> NodeAllocations:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return NodeAllocations(node=node, index=0)
        try:
            stored = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("agent.local_state_unreadable", extra={"fields": {"path": str(self.path), "error": str(exc)}})
            return NodeAllocations(node=node, index=0)
        if stored.node != node:
            log.warning("agent.local_state_foreign", extra={"fields": {"path": str(self.path), "node": stored.node}})
            return NodeAllocations(node=node, index=0)
        return stored

    def save(self, allocations: NodeAllocations) -> None:
        """Durable before it returns (fsync of the file and of the directory)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, _encoder.encode(allocations))
