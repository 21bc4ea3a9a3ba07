"""Client API for blob storage served by every node: S3 access keys issued
through the cluster (`cloudless s3 keys create` against a client config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from cloudless.api.routing import PermissionDenied
from cloudless.transport.rpc import RpcContext, RpcServer

if TYPE_CHECKING:
    from cloudless.blobs.cluster import BlobNode
    from cloudless.node.process import Node


class S3KeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str = ""


class S3KeyReply(msgspec.Struct, frozen=True):
    endpoint: str  # "" when no node serves the gateway (start one with `--s3-listen`)
    access_key: str
    secret_key: str
    endpoints: list[str] = []


class S3KeyList(msgspec.Struct, frozen=True):
    access_keys: list[str]


class S3KeyRemove(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    access_key: str


class BlobApi:
    def __init__(self, node: "Node", blobs: "BlobNode") -> None:
        self.node = node
        self.blobs = blobs

    def register(self, server: RpcServer) -> None:
        server.unary("blobs.keys.create", request=S3KeyCreate)(self.keys_create)
        server.unary("blobs.keys.list")(self.keys_list)
        server.unary("blobs.keys.rm", request=S3KeyRemove)(self.keys_rm)

    @staticmethod
    def _require_client(ctx: RpcContext) -> None:
        if ctx.peer.kind != "client":
            raise PermissionDenied("S3 keys are managed by clients")

    async def keys_create(self, ctx: RpcContext, req: S3KeyCreate) -> S3KeyReply:
        from cloudless.blobs.cluster import s3_endpoints

        self._require_client(ctx)
        key = await self.blobs.service.create_access_key(owner=ctx.peer.name or "admin", description=req.description[:200])
        endpoints = s3_endpoints(self.node)
        return S3KeyReply(endpoints[0] if endpoints else "", key.access_key, key.secret_key, endpoints)

    async def keys_list(self, ctx: RpcContext, body: bytes) -> S3KeyList:
        self._require_client(ctx)
        keys = await self.blobs.service.metadata.list_access_keys()
        return S3KeyList([k.access_key for k in keys])

    async def keys_rm(self, ctx: RpcContext, req: S3KeyRemove) -> S3KeyList:
        self._require_client(ctx)
        await self.blobs.service.metadata.delete_access_key(req.access_key)
        return S3KeyList([req.access_key])
