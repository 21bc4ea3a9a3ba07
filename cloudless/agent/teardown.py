"""Removing what a stopped node made on this host for its containers.

A node's containers outlive the node process on purpose (a restarted node
adopts them). When a node is gone for good — `cloudless dev down` — its
containers, their network plumbing and their root filesystems must go too,
and only its own: the runtime's network is scoped by a tag derived from the
node's sandbox directory (`BridgeConfig.for_node`), and mounts are looked up
under the node's data dir only.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import msgspec
import trio

from cloudless.errors import CloudlessError
from cloudless.sandbox.images import ImageStore
from cloudless.sandbox.network import BridgeNetwork
from cloudless.sandbox.rootfs import RootfsBuilder, mounts_under, unmount
from cloudless.sandbox.runc import RuncRuntime

log = logging.getLogger(__name__)


class SandboxRemoval(msgspec.Struct):
    containers: list[str] = []  # deleted (killed first if running)
    roots: list[str] = []  # container root filesystems released
    mounts: list[str] = []  # mount points found and unmounted after that
    network: str = ""  # the bridge removed (with every rule carrying its tag), if there was one
    errors: list[str] = []  # what could not be removed, and why


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def sandbox_dir(data_root: Path) -> Path:
    """Where `agent/boot.py` keeps the node's runc runtime."""
    return data_root / "agent" / "sandbox"


async def remove_node_sandbox(data_root: Path) -> SandboxRemoval:
    """Delete every container of the (stopped) node at `data_root`, its network, its roots and mounts."""
    removal = SandboxRemoval()
    sandbox = sandbox_dir(data_root)
    can_run_containers = os.geteuid() == 0 and shutil.which("runc") is not None
    if sandbox.is_dir() and can_run_containers:
        runtime = RuncRuntime(sandbox)
        try:
            for state in await runtime.list():
                try:
                    await runtime.delete(state.id)
                except CloudlessError as exc:
                    removal.errors.append(f"container {state.id}: {exc}")
                    continue
                removal.containers.append(state.id)
            removal.containers += [c for c in await runtime.sweep() if c not in removal.containers]
            network = runtime.network
            if isinstance(network, BridgeNetwork):  # always: only a runtime made rootless has none
                if _link_exists(network.config.bridge):
                    removal.network = network.config.bridge
                await network.remove_bridge()  # and the rules tagged with this node's tag
        finally:
            await runtime.aclose()
    images = data_root / "images"
    if (images / "rootfs").is_dir():
        builder = RootfsBuilder(ImageStore(images))
        for use in builder.existing():
            try:
                await trio.to_thread.run_sync(builder.release, use.container_id)
            except (CloudlessError, OSError) as exc:
                removal.errors.append(f"root of {use.container_id}: {exc}")
                continue
            removal.roots.append(use.container_id)

    for point in mounts_under(data_root):  # roots without a record (a crash between mount and record)
        try:
            await trio.to_thread.run_sync(unmount, point)
        except CloudlessError as exc:
            removal.errors.append(str(exc))
            continue
        removal.mounts.append(str(point))
    if removal.errors:
        log.warning("teardown.incomplete", extra={"fields": {"root": str(data_root), "errors": removal.errors}})
    return removal
