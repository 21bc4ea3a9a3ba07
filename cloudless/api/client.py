"""The cluster client the CLI uses: mTLS to any node, failing over across
the context's endpoints.

Writes carry a (client_id, seq) session so that a retry on another node
after an ambiguous failure applies at most once.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import trio

from cloudless.api.client_config import Context, parse_endpoint
from cloudless.authz import ProofSigner
from cloudless.errors import Unavailable
from cloudless.pki.credentials import Credentials
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.transport.rpc import DuplexStream, RpcClient
from cloudless.transport.tls import TlsCarrier

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClusterClient:
    def __init__(self, context: Context, endpoint: str | None = None, timeout: float = 10.0) -> None:
        self.context = context
        self.timeout = timeout
        endpoints = [endpoint] if endpoint else list(context.endpoints)
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        credentials = Credentials(context.ca_pem, context.certificate_pem, context.key_pem)
        verifier = PeerVerifier(credentials.ca_certificates, RevocationList(), context.cluster_id)
        # Every call is signed, so a node that forwards it can prove who asked.
        signer = ProofSigner(context.certificate_pem, context.key_pem)
        self._rpc = RpcClient(TlsCarrier(credentials, verifier), signer=signer)
        self.client_id = f"cli-{secrets.token_hex(8)}"
        self._seq = 0
        self._preferred = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _order(self) -> list[tuple[str, int]]:
        n = len(self.endpoints)
        return [self.endpoints[(self._preferred + i) % n] for i in range(n)]

    async def call(self, method: str, request: Any, response: type[T] | None = None, timeout: float | None = None) -> T:
        """Call `method` on the first endpoint that answers; Unavailable when none does."""
        last: Exception | None = None
        for i, address in enumerate(self._order()):
            try:
                result = await self._rpc.call(
                    address, method, request, response=response, timeout=timeout or self.timeout
                )
            except Unavailable as exc:  # includes ConnectionLost and DeadlineExceeded
                log.debug("client.failover", extra={"fields": {"endpoint": address, "error": str(exc)}})
                last = exc
                continue
            except OSError as exc:
                last = exc
                continue
            self._preferred = (self._preferred + i) % len(self.endpoints)
            return result
        raise Unavailable(f"no node answered ({', '.join(f'{h}:{p}' for h, p in self.endpoints)}): {last}")

    @asynccontextmanager
    async def stream(
        self, method: str, request: Any, item: type[T] | None = None, timeout: float | None = None
    ) -> AsyncIterator[AsyncIterator[T]]:
        last: Exception | None = None
        for address in self._order():
            try:
                async with self._rpc.stream(address, method, request, item=item, timeout=timeout) as items:
                    yield items
                    return
            except Unavailable as exc:
                last = exc
                continue
        raise Unavailable(f"no node answered: {last}")

    @asynccontextmanager
    async def duplex(
        self,
        method: str,
        request: Any,
        item: type[T] | Any = None,  # a Struct type or a union of them
        timeout: float | None = None,
    ) -> AsyncIterator[DuplexStream[Any]]:
        """A duplex call on the first endpoint that takes it (no failover once it has started)."""
        last: Exception | None = None
        async with AsyncExitStack() as stack:
            for address in self._order():
                try:
                    call = await stack.enter_async_context(
                        self._rpc.duplex(address, method, request, item=item, timeout=timeout)
                    )
                    break
                except (Unavailable, OSError) as exc:
                    last = exc
            else:
                raise Unavailable(f"no node answered: {last}")
            yield call

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self._rpc.aclose()
