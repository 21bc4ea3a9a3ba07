"""The connections a node holds open, so that revoking an identity ends them.

A certificate check runs once per handshake; without this, an identity
revoked after connecting (a removed node, a revoked user) keeps every
connection and stream it already had.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import trio

from cloudless.transport.base import Connection

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0


class LiveConnections:
    def __init__(self) -> None:
        self._connections: set[Connection] = set()
        self.closed_for_revocation = 0

    @contextmanager
    def tracking(self, connection: Connection) -> Iterator[None]:
        self._connections.add(connection)
        try:
            yield
        finally:
            self._connections.discard(connection)

    def __len__(self) -> int:
        return len(self._connections)

    async def close_revoked(self, is_revoked: Callable[[int], bool], others: Iterable[Connection] = ()) -> int:
        """Close every tracked connection (and each of `others`) whose peer's certificate is revoked."""
        victims = [
            c for c in {*self._connections, *others} if not c.is_closed and c.peer.serial and is_revoked(c.peer.serial)
        ]
        for connection in victims:
            log.warning(
                "transport.revoked_peer_disconnected",
                extra={"peer": connection.peer.uri, "serial": f"{connection.peer.serial:x}"},
            )
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                await connection.aclose()
            if scope.cancelled_caught:
                log.warning("transport.revoked_peer_close_timeout", extra={"peer": connection.peer.uri})
        self.closed_for_revocation += len(victims)
        return len(victims)
