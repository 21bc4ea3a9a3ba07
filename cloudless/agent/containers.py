"""From an allocation and its workload spec to the runtime's ContainerSpec,
and the root filesystems they run in.

`RootfsProvider` is the interface the agent prepares roots through:
`ImageRootfs` builds them from the node's ImageStore (pulling from a
registry when the image is missing and its reference names one);
`MemoryRootfs` is the twin for tests.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Protocol

import trio

from cloudless.agent.images_from_peers import PeerImages
from cloudless.errors import CloudlessError
from cloudless.sandbox.images import ImageNotFound, ImageStore
from cloudless.sandbox.oci import ImageConfig
from cloudless.sandbox.reference import parse_reference
from cloudless.sandbox.registry import RegistryClient
from cloudless.sandbox.rootfs import RootfsBuilder
from cloudless.sandbox.runtime import ContainerSpec, HealthCheck, PortMapping, RestartPolicy
from cloudless.state.workload import Allocation, WorkloadSpec

log = logging.getLogger(__name__)

ALLOCATION_LABEL = "cloudless.allocation"
WORKLOAD_LABEL = "cloudless.workload"
VERSION_LABEL = "cloudless.version"


class ImageUnavailable(CloudlessError):
    """The image is not on this node and cannot be fetched."""


def container_id(allocation_id: str) -> str:
    """The runtime's id for an allocation: the allocation id when it fits (63 characters)."""
    if len(allocation_id) <= 63:
        return allocation_id
    return f"{allocation_id[:54]}-{hashlib.sha256(allocation_id.encode()).hexdigest()[:8]}"


def container_spec(allocation: Allocation, spec: WorkloadSpec, rootfs: str, image: ImageConfig) -> ContainerSpec:
    """Docker's rules: the workload's command replaces the image's CMD and follows its ENTRYPOINT."""
    args = list(image.entrypoint) + list(spec.command or image.cmd)
    if not args:
        args = ["sh"]
    env: dict[str, str] = {}
    for item in image.env:
        key, _, value = item.partition("=")
        if key:
            env[key] = value
    env.update(spec.env)
    hostname = allocation.id[:63]
    env.setdefault("HOSTNAME", hostname)
    env["CLOUDLESS_ALLOCATION"] = allocation.id
    env["CLOUDLESS_WORKLOAD"] = allocation.workload
    env["CLOUDLESS_REPLICA"] = str(allocation.replica)
    ports = [PortMapping(p.host_port, p.container_port, p.protocol) for p in spec.ports if p.host_port is not None]
    r = spec.restart
    hc = spec.health_check
    health = None
    if hc is not None:
        health = HealthCheck(
            kind=hc.kind,
            command=list(hc.command),
            port=hc.port,
            path=hc.path,
            interval=hc.interval_s,
            timeout=hc.timeout_s,
            retries=hc.retries,
            start_period=hc.start_period_s,
        )
    return ContainerSpec(
        id=container_id(allocation.id),
        rootfs=str(rootfs),
        args=args,
        env=env,
        cwd=image.working_dir or "/",
        user=image.user or "0:0",
        hostname=hostname,
        cpu=max(0.01, spec.resources.cpu_millis / 1000),
        memory_bytes=max(4 << 20, spec.resources.memory_bytes),
        # Containers that publish nothing get no network: a dev cluster runs
        # several nodes on one host, and a bridge per node is set up only when needed.
        network="bridge" if spec.ports else "none",
        ports=ports,
        restart=RestartPolicy(
            mode=r.mode, max_retries=r.max_retries, backoff_initial=r.backoff_initial_s, backoff_max=r.backoff_max_s
        ),
        health=health,
        labels={
            ALLOCATION_LABEL: allocation.id,
            WORKLOAD_LABEL: allocation.workload,
            VERSION_LABEL: str(allocation.version),
        },
    )


def _names_registry(image: str) -> bool:
    """Whether a reference names a registry to pull from; a bare name ("busybox:latest") does not."""
    return not ("/" not in image.split("@", 1)[0].split(":", 1)[0] and "." not in image.split("/", 1)[0])


class RootfsProvider(Protocol):
    async def prepare(self, container_id: str, image: str) -> tuple[str, ImageConfig]: ...

    async def release(self, container_id: str) -> None: ...


class ImageRootfs:
    """Roots from the node's image store (`<data dir>/images`, as `cloudless image` uses)."""

    def __init__(
        self,
        images_dir: Path,
        *,
        pull_timeout: float = 120.0,
        oci_blobs=None,
        node_id: str = "",
        events=None,
        peer_publish_wait: float = 10.0,
    ) -> None:
        """`oci_blobs` (a callable returning the node's OciBlobs or None) enables
        fetching missing images from peers' blob store before any registry."""
        self.store = ImageStore(images_dir)
        self.builder = RootfsBuilder(self.store)
        self.pull_timeout = pull_timeout
        self.peer_publish_wait = peer_publish_wait
        self._peer_misses: dict[str, float] = {}  # image → when a wait for its publication last ended empty
        self.peers = (
            PeerImages(self.store, oci_blobs, node_id=node_id, events=events) if oci_blobs is not None else None
        )

    async def prepare(self, container_id: str, image: str) -> tuple[str, ImageConfig]:
        try:
            prepared = await self.builder.aprepare(container_id, image)
        except ImageNotFound:
            peer_error = await self._from_peers(image)
            if peer_error is not None:
                try:
                    await self._pull(image)
                except ImageUnavailable as exc:
                    raise ImageUnavailable(f"{exc.message}; from peers: {peer_error}", image=image) from None
            prepared = await self.builder.aprepare(container_id, image)
        return str(prepared.path), prepared.config

    async def _from_peers(self, image: str) -> str | None:
        """Fetch the image from peers' blob store; None on success, else why not."""
        if self.peers is None:
            return "no blob store on this node"
        wait = 0.0
        try:
            with trio.fail_after(self.pull_timeout):
                # A name no registry serves can only come from peers: give a
                # peer that imported it moments ago time to publish it.
                # (Not again for a while after a full wait found nothing: the
                # agent starts allocations one after another.)
                recently_missed = trio.current_time() - self._peer_misses.get(image, -1e9) < 30.0
                wait = 0.0 if _names_registry(image) or recently_missed else self.peer_publish_wait
                await self.peers.fetch(image, wait_for_publish=wait)
        except trio.TooSlowError:
            return f"took longer than {self.pull_timeout:g}s"
        except CloudlessError as exc:
            log.info("agent.peer_image_unavailable", extra={"fields": {"image": image, "error": exc.message}})
            if wait:
                self._peer_misses[image] = trio.current_time()
            return exc.message
        self._peer_misses.pop(image, None)
        return None

    async def _pull(self, image: str) -> None:
        ref = parse_reference(image)
        if not _names_registry(image):
            # A bare name ("busybox:latest") is expected to be imported on the node.
            raise ImageUnavailable(
                f"image {image} is not on this node (import it with `cloudless image import`)", image=image
            )
        log.info("agent.pull", extra={"fields": {"image": image}})
        try:
            with trio.fail_after(self.pull_timeout):
                async with RegistryClient(self.store) as client:
                    await client.pull(ref)
        except trio.TooSlowError:
            raise ImageUnavailable(f"pulling {image} took longer than {self.pull_timeout:g}s", image=image) from None
        except CloudlessError as exc:
            raise ImageUnavailable(
                f"image {image} is not on this node and pulling it failed: {exc.message}", image=image
            ) from None

    async def release(self, container_id: str) -> None:
        await self.builder.arelease(container_id)


class MemoryRootfs:
    """The twin: every image exists (unless listed in `missing`) with a fixed config."""

    def __init__(self, config: ImageConfig = ImageConfig(cmd=["sh"])) -> None:
        self.config = config
        self.missing: set[str] = set()
        self.prepared: dict[str, str] = {}

    async def prepare(self, container_id: str, image: str) -> tuple[str, ImageConfig]:
        if image in self.missing:
            raise ImageUnavailable(f"image {image} is not on this node", image=image)
        self.prepared[container_id] = image
        return f"/memory/rootfs/{container_id}", self.config

    async def release(self, container_id: str) -> None:
        self.prepared.pop(container_id, None)
