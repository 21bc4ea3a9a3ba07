"""`cloudless node`: one trio nursery running every service of a device.

    run_node
    ├── establish_identity   enroll (--join) or bootstrap a cluster, once per data dir
    └── Node(...)            constructs every subsystem, wired through narrow ports
        └── Node.run
            ├── UdpEndpoint          one UDP socket: QUIC and sealed gossip, split by first byte
            ├── TlsCarrier.serve     TCP on the same port number: TLS 1.3 (mTLS, or enrollment)
            ├── QuicCarrier.serve    QUIC on the UDP socket
            ├── ReplicatedState      Raft driver over RocksDB + the state machine
            ├── GossipDriver         SWIM + Lifeguard membership with this device's metadata
            ├── Coordinator          on the Raft leader only: autopilot, CA duties (node/autopilot.py)
            ├── Workloads            agent, workload controller, workload API (node/workloads.py)
            ├── BlobStorage          chunk store, GC, anti-entropy, S3 gateway (node/blobs.py)
            ├── revocation sync      keeps the verifier's revocation list current
            └── certificate renewal  renews this node's certificate at two-thirds of its life

This module is the composition root: it alone constructs subsystems and
connects them; services receive the ports of `cloudless.ports` (a
`ClusterView`, a `Proposer`, an event recorder), never the `Node`. A `Node`
is complete once constructed; `run` only starts what it holds.

Every service is started with `nursery.start`; a node answers requests only
once all of them are up. SIGTERM leaves gossip gracefully and hands Raft
leadership away first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import msgspec
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudless.api.ca import CAApi, CABundle
from cloudless.api.client_config import ClientConfig, Context, parse_endpoint
from cloudless.api.http import metrics_app, serve_https
from cloudless.api.identities import IdentityApi
from cloudless.api.service import ApiService
from cloudless.authz import CallGate, ProofVerifier, is_listed
from cloudless.blobs.chunkstore import LocalChunkStore
from cloudless.blobs.oci import OciBlobs
from cloudless.coordinator.autopilot import AutopilotConfig
from cloudless.durable import write_atomic
from cloudless.errors import CloudlessError, InvalidInput, Unavailable
from cloudless.gossip.core import GossipConfig, GossipCore
from cloudless.gossip.driver import GossipDriver
from cloudless.gossip.keyring import Keyring, PacketSealer
from cloudless.gossip.metadata import ARCH_LABEL, CLASS_LABEL, Metadata, Resources
from cloudless.node.autopilot import Coordinator
from cloudless.node.blobs import BlobStorage, advertised_disk, s3_label
from cloudless.node.controller import node_infos
from cloudless.node.datadir import DataDir, NodeRecordFile, new_node_id, validate_node_name
from cloudless.node.device import DeviceProfile, detect, detect_runtime, runtime_labels
from cloudless.node.enroll import enroll
from cloudless.node.enroll_service import EnrollService, RenewReply, RenewRequest, node_certificate_lifetime
from cloudless.node.gossip_identity import GossipIdentity, decode_reply, install_keyring, keys_reply, public_key_der
from cloudless.node.membership import Membership
from cloudless.node.replicated import ReplicatedState
from cloudless.node.workloads import Workloads
from cloudless.observability.events import EventLog
from cloudless.observability.metrics import NodeMetrics
from cloudless.pki.bundle import accept_offered_bundle
from cloudless.pki.ca import ClusterCA, certificate_fingerprint
from cloudless.pki.credentials import Credentials, issue_credentials, make_csr, new_private_key, private_key_pem
from cloudless.pki.custody import load_kek, new_kek, open_ca_key, save_kek, seal_ca_key
from cloudless.pki.errors import InvalidCredentials
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.scheduler import NodeInfo
from cloudless.state.commands import RecordClientCertificate, RegisterNode, SetGossipKeyring, StoreClusterCA
from cloudless.transport.base import Connection
from cloudless.transport.live import LiveConnections
from cloudless.transport.quic import QuicCarrier
from cloudless.transport.rpc import RpcClient, RpcServer
from cloudless.transport.tls import TlsCarrier
from cloudless.transport.udp import UdpEndpoint

log = logging.getLogger(__name__)

GOSSIP_KEYS_FILE = "gossip.keys"
BOOTSTRAP_PENDING_FILE = "bootstrap.pending"


@dataclass
class NodeOptions:
    data_dir: Path
    listen: tuple[str, int] = ("127.0.0.1", 7946)
    advertise: tuple[str, int] | None = None
    join: tuple[str, int] | None = None
    token: str | None = None
    name: str | None = None
    region: str = ""
    zone: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    power: str | None = None
    battery: float | None = None
    network: str | None = None
    device_class: str | None = None
    # Election timeout 300-600 ms, heartbeats every 100 ms: fast failover on a
    # LAN without a heartbeat every tick (idle CPU).
    tick_interval: float = 0.05
    election_tick: int = 6
    heartbeat_tick: int = 2
    autopilot: AutopilotConfig = field(default_factory=AutopilotConfig)
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None
    s3_listen: tuple[str, int] | None = None  # HTTPS S3 gateway (off by default)
    # runc | rootless | memory | none; None: detect (CLOUDLESS_RUNTIME, then root/rootless runc)
    runtime: str | None = None
    # Called with the admin client config's path once this node has created a new cluster
    # (the CLI merges it into the user's client config and says so).
    on_bootstrapped: Callable[[Path], None] | None = None


# Calls one identity may hold open on this node at once (RpcServer): far above
# what a node (Raft streams, chunk transfers, log follows) or a CLI needs.
MAX_CALLS_PER_IDENTITY = 1024


class BootstrapPending(msgspec.Struct):
    """What the first node must still put into Raft (kept until committed)."""

    cluster_id: str
    ca_cert_pem: bytes
    ca_sealed_key: bytes  # pki.custody: the KEK stays in this data dir, outside Raft
    gossip_key: bytes
    admin_serial: str = ""  # the bootstrap admin's certificate, recorded so `users rm admin` can revoke it
    admin_not_after: float = 0.0


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    return parse_endpoint(text)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# -- identity ----------------------------------------------------------------------


async def establish_identity(options: NodeOptions, data: DataDir, events: EventLog) -> None:
    """Make `data` an enrolled data dir: join through `--join`, or bootstrap a new cluster.

    Nothing to do when it is enrolled already (a restart resumes its identity)."""
    data.create()
    if data.is_enrolled():
        if options.join and options.token:
            log.info("node.already_enrolled", extra={"fields": {"data_dir": str(data.root)}})
        return
    name = validate_node_name(options.name) if options.name else new_node_id()
    advertise = options.advertise or options.listen
    if options.join is None:
        _bootstrap(data, name, advertise, events)
        if options.on_bootstrapped is not None:
            options.on_bootstrapped(data.admin_config)
        return
    if not options.token:
        raise InvalidInput("--join needs --token (create one with `cloudless token create`)", field="token")
    credentials, reply = await enroll(
        options.join,
        options.token,
        name=name,
        advertise=format_address(advertise),
        region=options.region,
        zone=options.zone,
        labels=options.labels,
    )
    credentials.save(data.tls)
    if reply.ca_kek:
        save_kek(data.root, reply.ca_kek)
    write_atomic(data.root / GOSSIP_KEYS_FILE, msgspec.msgpack.encode(reply.gossip_keys))
    write_atomic(data.root / "seeds", msgspec.msgpack.encode(reply.seeds))
    write_atomic(data.root / "revocations", reply.revocations)
    data.save_record(NodeRecordFile(name, reply.cluster_id, format_address(advertise)))
    events.record("node.joined", name, f"joined cluster {reply.cluster_id} through {format_address(options.join)}")


def _bootstrap(data: DataDir, name: str, advertise: tuple[str, int], events: EventLog) -> None:
    """Create a cluster: CA, this node as its only voter, an admin client config."""
    now = datetime.now(UTC)
    cluster_id = f"c-{secrets.token_hex(4)}"
    ca = ClusterCA.create(cluster_id, now)
    credentials = issue_credentials(ca, Identity(cluster_id, "node", name), now, node_certificate_lifetime())
    credentials.save(data.tls)
    cert_pem, key_pem = ca.to_pem()
    kek = new_kek()
    save_kek(data.root, kek)
    sealed_key = seal_ca_key(kek, key_pem, cluster_id, ca.fingerprint)
    del key_pem
    gossip_key = os.urandom(32)
    admin = issue_credentials(
        ca, Identity(cluster_id, "client", "admin"), now, lifetime=timedelta(days=365), role="admin"
    )
    pending = BootstrapPending(
        cluster_id, cert_pem, sealed_key, gossip_key, format(admin.serial, "x"), admin.not_after.timestamp()
    )
    write_atomic(data.root / BOOTSTRAP_PENDING_FILE, msgspec.msgpack.encode(pending))
    write_atomic(data.root / GOSSIP_KEYS_FILE, msgspec.msgpack.encode([gossip_key]))
    ReplicatedState.bootstrap(data.raft, name)
    config = ClientConfig(
        contexts={
            cluster_id: Context(
                cluster_id,
                cluster_id,
                [format_address(advertise)],
                admin.ca_pem,
                admin.cert_pem,
                admin.key_pem,
            )
        },
        current_context=cluster_id,
    )
    config.save(data.admin_config)
    data.save_record(NodeRecordFile(name, cluster_id, format_address(advertise)))
    events.record("cluster.bootstrapped", name, f"created cluster {cluster_id}")
    log.info("node.bootstrapped", extra={"fields": {"cluster": cluster_id, "node": name}})


async def run_node(options: NodeOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """`cloudless node`: establish this device's identity, build the node, run it."""
    if options.listen[1] == 0:
        raise InvalidInput("--listen needs an explicit port: UDP and TCP must share it", field="listen")
    events = EventLog()
    await establish_identity(options, DataDir(options.data_dir), events)
    node = Node(options, events)
    await node.run(task_status=task_status)


# The device's link as gossip metadata names it (a metered link is cellular).
_GOSSIP_NETWORK: dict[str, Literal["wired", "wifi", "cellular"]] = {
    "wired": "wired",
    "wifi": "wifi",
    "metered": "cellular",
}

# -- the node ----------------------------------------------------------------------


class Node:
    """Every subsystem of an enrolled device, constructed and connected.

    `data_dir` must be enrolled (`establish_identity`); construct it inside
    `trio.run` (gossip reads trio's clock). Construction opens the Raft log
    and the chunk store and binds nothing; `run` serves until SIGTERM or
    `stop()`, then closes them (`close()` does so for a node never run).
    """

    def __init__(self, options: NodeOptions, events: EventLog | None = None) -> None:
        if options.listen[1] == 0:
            raise InvalidInput("--listen needs an explicit port: UDP and TCP must share it", field="listen")
        self.options = options
        self.data = DataDir(options.data_dir)
        record = self.data.load_record()
        self.node_id, self.cluster_id = record.node_id, record.cluster_id
        self.advertise: tuple[str, int] = options.advertise or (
            parse_address(record.advertise) if record.advertise else options.listen
        )
        self.events = events or EventLog()
        self.metrics = NodeMetrics()
        self.device: DeviceProfile = self._detect_device()
        # Decided once: the agent is built for it, and gossip advertises it so
        # the scheduler never places a container where it cannot run.
        self.runtime, self.runtime_reason = detect_runtime(
            options.runtime or os.environ.get("CLOUDLESS_RUNTIME") or None, data_dir=self.data.root
        )
        self.runtime_labels = runtime_labels(self.runtime)
        self.started_at = time.time()
        self.stopping = trio.Event()
        self.ready = trio.Event()
        self.credentials = Credentials.load(self.data.tls)
        self.revocations = RevocationList()
        revocations_file = self.data.root / "revocations"
        if revocations_file.exists():
            self.revocations.install(RevocationList.from_bytes(revocations_file.read_bytes()))
        self.live = LiveConnections()
        self._revocations_changed = trio.Event()
        self._trust_changed = trio.Event()  # the CA bundle changed: the renewal loop looks at once
        verifier = self.verifier = PeerVerifier(self.credentials.ca_certificates, self.revocations, self.cluster_id)
        # Default deny on every call: authz's permission table, with forwarded
        # client calls authorized by the client's own signed proof.
        gate = CallGate(ProofVerifier(verifier))
        self.server = RpcServer(listed=is_listed, max_calls_per_peer=MAX_CALLS_PER_IDENTITY, authorize=gate)
        # Enrollment requests are small (a CSR and a token): a small frame cap
        # bounds what an unauthenticated peer can make us buffer.
        self.enroll_server = RpcServer(listed=is_listed, max_frame_size=64 * 1024, request_timeout=5.0, authorize=gate)
        self.endpoint = UdpEndpoint(*options.listen)
        self.tls = TlsCarrier(self.credentials, verifier, bind=options.listen, enrollment=True)
        self.quic = QuicCarrier(self.credentials, verifier, endpoint=self.endpoint)
        self.rpc = RpcClient(self.tls)
        with contextlib.ExitStack() as opened:
            self.replicated = ReplicatedState(
                self.node_id,
                self.data.raft,
                self.rpc,
                # Late-bound: membership reads the replicated node registry, so it is built after.
                lambda node_id: self.membership.address_of(node_id),
                tick_interval=options.tick_interval,
                election_tick=options.election_tick,
                heartbeat_tick=options.heartbeat_tick,
                clock=time.time,
                leader_hint=lambda: self.membership.leader_hint(),
            )
            opened.callback(self.replicated.close)
            self.chunks = LocalChunkStore(self.data.root / "blobs" / "store")
            opened.callback(self.chunks.close)
            self.s3_endpoint = "https://" + format_address(options.s3_listen) if options.s3_listen else ""
            # A member's alive/leave is signed with its node key and checked against
            # the keys Raft recorded for it: the shared keyring alone forges nothing.
            self.gossip_identity = GossipIdentity(
                self.cluster_id, self._current_credentials, lambda: self.replicated.fsm, self._in_raft
            )
            self.gossip = self._build_gossip()
            self.metrics.observe(self.replicated, self.server, self.gossip)
            self.membership = Membership(self.node_id, self.cluster_id, self.replicated, self.gossip, self.metadata)
            self.coordinator = Coordinator(
                self.membership,
                self.replicated,
                self.events,
                options.autopilot,
                complete_bootstrap=self.complete_bootstrap,
                own_uptime=self.uptime,
                count_decision=lambda kind: self.metrics.autopilot_decisions.labels(kind).inc(),
            )
            self.blobs = BlobStorage(
                self.chunks,
                root=self.data.root / "blobs",
                cluster=self.membership,
                replicated=self.replicated,
                rpc=self.rpc,
                server=self.server,
                events=self.events,
                signing_ca=self.signing_ca,
                region=options.region,
                s3_listen=options.s3_listen,
                s3_endpoint=self.s3_endpoint,
            )
            self.workloads = Workloads(
                runtime=self.runtime,
                runtime_reason=self.runtime_reason,
                root=self.data.root,
                images_dir=self.data.root / "images",
                cluster=self.membership,
                leader_address=self.membership.leader_address,
                replicated=self.replicated,
                rpc=self.rpc,
                server=self.server,
                events=self.events,
                nodes=self.node_infos,
                oci_blobs=OciBlobs(self.blobs.service),
            )
            self.replicated.register(self.server)
            ApiService(self.membership, self.replicated, self.rpc, self.events).register(self.server)
            IdentityApi(self.membership, self.replicated, self.rpc, self.events, self.signing_ca).register(self.server)
            CAApi(
                self.membership,
                self.replicated,
                self.rpc,
                self.events,
                signing_ca=self.signing_ca,
                ca_kek=lambda: load_kek(self.data.root),
                own_bundle=lambda: self.credentials.ca_pem,
            ).register(self.server)
            EnrollService(
                self.membership,
                self.replicated,
                self.rpc,
                self.events,
                self.revocations,
                ca_pem=lambda: self.credentials.ca_pem,
                signing_ca=self.signing_ca,
                ca_kek=lambda: load_kek(self.data.root),
            ).register(self.enroll_server, self.server)
            self.server.unary("gossip.stream")(self._serve_gossip_stream)
            self.server.unary("gossip.keys")(self._serve_gossip_keys)
            self.replicated.change_listeners.append(self._on_state_change)
            self.gossip.add_listener(self._on_member_event)
            self._refresh_revocations()
            self._close = opened.pop_all()

    def _detect_device(self) -> DeviceProfile:
        o = self.options
        return detect(o.power, o.battery, o.network, o.device_class)  # type: ignore[arg-type]  # validated by the CLI

    def _build_gossip(self) -> GossipDriver:
        keys = self._gossip_keys()
        core = GossipCore(
            self.node_id,
            format_address(self.advertise),
            rng=random.Random(),
            now=trio.current_time(),
            config=GossipConfig(),
            meta=self.metadata(),
            claims=self.gossip_identity.claims(),
        )
        return GossipDriver(core, self.endpoint, PacketSealer(Keyring(keys[0], keys[1:])), self._gossip_exchange)

    # -- lookups -------------------------------------------------------------------

    def address_of(self, node_id: str) -> tuple[str, int] | None:
        return self.membership.address_of(node_id)

    def uptime(self) -> float:
        return max(0.0, time.time() - self.started_at)

    def node_infos(self) -> list[NodeInfo]:
        return node_infos(self.membership, self.replicated, self.coordinator.uptime_and_flaps)

    def metadata(self) -> Metadata:
        roles: list[str] = []
        conf = self.replicated.core.conf_state
        if self.node_id in conf.voters:
            roles.append("voter")
        elif self.node_id in conf.learners:
            roles.append("learner")
        if self.replicated.is_leader:
            roles.append("leader")
        d = self.device
        blob_total, blob_free = advertised_disk(self.chunks)
        network = _GOSSIP_NETWORK[d.network]
        return Metadata(
            region=self.options.region,
            zone=self.options.zone,
            labels=dict(self.options.labels)
            | s3_label(self.s3_endpoint)
            | {ARCH_LABEL: d.arch, CLASS_LABEL: d.device_class}
            | self.runtime_labels,
            roles=tuple(roles),
            capacity=Resources(cpu_millis=d.cpu_count * 1000, memory_bytes=d.memory_bytes, disk_bytes=blob_total),
            free=Resources(cpu_millis=d.cpu_count * 1000, memory_bytes=d.memory_bytes, disk_bytes=blob_free),
            power=d.power,
            battery_percent=int(d.battery_pct) if d.battery_pct is not None else None,
            charging=d.charging,
            network=network,
            metered=d.network == "metered",
        )

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.endpoint.run)
                await nursery.start(self.tls.serve, self._on_connection)
                await nursery.start(self.quic.serve, self._on_connection)
                await nursery.start(self.replicated.run)
                await nursery.start(self._run_gossip)
                await nursery.start(self.coordinator.run)
                await nursery.start(self.workloads.run)
                await nursery.start(self.blobs.run)
                nursery.start_soon(self._revocation_sync)
                nursery.start_soon(self._cut_revoked_connections)
                nursery.start_soon(self._renewal_loop)
                nursery.start_soon(self._metadata_loop)
                if self.options.metrics_listen is not None:
                    await nursery.start(
                        serve_https, metrics_app(self.metrics.render), self.options.metrics_listen, self.data.tls
                    )
                nursery.start_soon(self._signals, nursery)
                self.ready.set()
                log.info(
                    "node.ready",
                    extra={
                        "fields": {
                            "node": self.node_id,
                            "cluster": self.cluster_id,
                            "address": format_address(self.advertise),
                        }
                    },
                )
                task_status.started(self.advertise)
                await self.stopping.wait()
                await self._leave_gracefully()
                nursery.cancel_scope.cancel()
        finally:
            self.close()

    def close(self) -> None:
        self._close.close()

    async def _on_connection(self, connection: Connection) -> None:
        if connection.peer.kind == "enrollee":
            await self.enroll_server.serve_connection(connection)
            return
        try:
            with self.live.tracking(connection):
                await self.server.serve_connection(connection)
        finally:
            # A node's connection ending is the first sign that it died: the
            # kernel closes a killed process's sockets at once, long before
            # gossip's own round-robin would probe it. Only a hint: gossip
            # probes it now, and only a failed probe makes it suspect.
            peer = connection.peer
            if peer.kind == "node" and not self.stopping.is_set():
                self.gossip.hint_unreachable(peer.name)

    async def _run_gossip(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.gossip.run)
            seeds = self._seeds()
            if seeds:
                await self.gossip.join(seeds)
            task_status.started()
            await self._rejoin_loop()

    async def _rejoin_loop(self) -> None:
        """Join again whenever we know of no other live member.

        A node that restarts after a graceful leave (or after everyone else
        restarted) is "left"/"dead" in its peers' tables, and they do not
        probe such members: the rejoin is ours to make.
        """
        while True:
            await trio.sleep(2.0)
            if len(self.gossip.core.live_members()) > 1:
                continue
            seeds = self._seeds()
            if seeds:
                await self.gossip.join(seeds)

    def _gossip_keys(self) -> list[bytes]:
        if self.replicated.fsm.gossip_keys:
            return list(self.replicated.fsm.gossip_keys)
        path = self.data.root / GOSSIP_KEYS_FILE
        return list(msgspec.msgpack.decode(path.read_bytes(), type=list[bytes]))

    def _seeds(self) -> list[str]:
        seeds: list[str] = []
        if self.options.join is not None:
            seeds.append(format_address(self.options.join))
        path = self.data.root / "seeds"
        if path.exists():
            seeds.extend(msgspec.msgpack.decode(path.read_bytes(), type=list[str]))
        seeds.extend(r.address for n, r in self.replicated.fsm.nodes.items() if n != self.node_id)
        own = format_address(self.advertise)
        return sorted({s for s in seeds if s != own})

    async def _gossip_exchange(self, addr: str, request: bytes) -> bytes:
        return await self.rpc.call(parse_address(addr), "gossip.stream", request, timeout=5.0)

    def _current_credentials(self) -> Credentials:
        return self.credentials

    def _in_raft(self) -> bool:
        conf = self.replicated.core.conf_state
        return self.node_id in conf.voters or self.node_id in conf.learners

    async def _serve_gossip_keys(self, ctx, body: bytes) -> bytes:
        if ctx.peer.kind != "node":
            raise CloudlessError("gossip keys are for nodes")
        return msgspec.msgpack.encode(keys_reply(self.replicated.fsm, ctx.peer.name))

    async def _sync_gossip_keys(self, address: tuple[str, int]) -> None:
        """A node outside Raft fetches the keyring and members' keys with the revocations."""
        try:
            reply = decode_reply(await self.rpc.call(address, "gossip.keys", b"", timeout=3.0))
        except (CloudlessError, msgspec.DecodeError) as exc:
            log.debug("node.gossip_keys_sync_failed", extra={"fields": {"error": str(exc)}})
            return
        self.gossip_identity.install_synced(reply)
        self._install_gossip_keys(reply.keyring)

    def _install_gossip_keys(self, keys: list[bytes]) -> None:
        if install_keyring(self.gossip.sealer.keyring, keys):
            write_atomic(self.data.root / GOSSIP_KEYS_FILE, msgspec.msgpack.encode(keys))
            log.info("node.gossip_keyring_installed", extra={"fields": {"keys": len(keys)}})

    async def _serve_gossip_stream(self, ctx, body: bytes) -> bytes:
        if ctx.peer.kind != "node":
            raise CloudlessError("gossip streams are for nodes")
        return await self.gossip.serve_stream(body)

    def _on_member_event(self, event) -> None:
        kind = type(event).__name__
        self.events.record(f"member.{kind.removeprefix('Member').lower()}", event.name, f"{event.name}: {kind}")

    def _on_state_change(self, changes) -> None:
        kinds = {c.kind for c in changes}
        if kinds & {"node", "snapshot"}:
            # Known members' addresses, so a restart can rejoin gossip before
            # the Raft log is replayed (or when this node is outside Raft).
            own = format_address(self.advertise)
            known = sorted(r.address for r in self.replicated.fsm.nodes.values() if r.address != own)
            if known:
                write_atomic(self.data.root / "seeds", msgspec.msgpack.encode(known))
        if kinds & {"revocation", "node", "snapshot"}:
            self._refresh_revocations()
        if kinds & {"ca", "snapshot"}:
            self._install_trust(self.replicated.fsm.trust_bundle())
        if kinds & {"gossip_keys", "snapshot"}:
            keys = self.replicated.fsm.gossip_keys
            if keys:
                self._install_gossip_keys(list(keys))  # the running keyring, and its copy in the data dir

    def _install_trust(self, bundle: bytes) -> None:
        """Trust the CA bundle `bundle` (a CA rotation began, activated or retired): from the
        next handshake on, in the transports, the verifier and `tls/ca.pem`."""
        credentials = self.credentials
        if not bundle or bundle == credentials.ca_pem:
            return
        try:
            fresh = credentials.with_bundle(bundle)
        except InvalidCredentials as exc:
            # A bundle without our certificate's issuer: an older state being replayed at
            # start-up (a later entry brings ours back), or our CA was retired before we
            # re-issued (peers refuse us; re-enroll). Either way keep what we trust.
            log.warning("node.bundle_without_our_issuer", extra={"fields": {"error": str(exc)}})
            return
        fresh.save(self.data.tls)
        self.credentials = fresh
        self.verifier.trust(fresh.ca_certificates)
        for carrier in (self.tls, self.quic):
            carrier.update_credentials(fresh)
        self.events.record("pki.trust_changed", self.node_id, f"{len(fresh.ca_certificates)} CA(s) trusted")
        self._trust_changed.set()

    def _refresh_revocations(self) -> None:
        replicated = self.replicated
        if replicated.fsm.applied_index == 0:
            return
        fresh = RevocationList()
        for serial, not_after in replicated.fsm.revoked.items():
            fresh.add(int(serial, 16), utc(not_after))
        if set(fresh) != set(self.revocations):
            self.revocations.install(fresh)
            write_atomic(self.data.root / "revocations", fresh.to_bytes())
            self._revocations_changed.set()

    async def _cut_revoked_connections(self) -> None:
        """Revocation bites at once: end the open connections of identities revoked since they connected."""
        while True:
            await self._revocations_changed.wait()
            self._revocations_changed = trio.Event()
            await self.live.close_revoked(self.revocations.is_revoked, self.rpc.pool.connections())

    async def _revocation_sync(self) -> None:
        """Nodes outside Raft learn revocations from the leader."""
        while True:
            await trio.sleep(5.0)
            replicated = self.replicated
            if self.node_id in replicated.core.conf_state.voters + replicated.core.conf_state.learners:
                continue
            leader = replicated.leader or self.membership.leader_hint()
            address = self.address_of(leader) if leader else None
            if address is None:
                continue
            try:
                raw = await self.rpc.call(address, "pki.revocations", b"", timeout=3.0)
                fresh = RevocationList.from_bytes(raw)
            except CloudlessError as exc:
                log.debug("node.revocation_sync_failed", extra={"fields": {"error": str(exc)}})
                continue
            if set(fresh) != set(self.revocations):
                self.revocations.install(fresh)
                write_atomic(self.data.root / "revocations", fresh.to_bytes())
                self._revocations_changed.set()
            await self._sync_gossip_keys(address)
            await self._sync_trust(address)

    async def _sync_trust(self, address: tuple[str, int]) -> None:
        """Outside Raft, the CA bundle comes from the leader (over a connection the current one verified)."""
        try:
            reply = await self.rpc.call(address, "pki.trust", b"", response=CABundle, timeout=3.0)
            if reply.ca_pem and reply.ca_pem != self.credentials.ca_pem:
                self._install_trust(
                    accept_offered_bundle(self.credentials.ca_pem, reply.ca_pem, self.cluster_id, reply.endorsement)
                )
        except CloudlessError as exc:
            log.debug("node.trust_sync_failed", extra={"fields": {"error": str(exc)}})

    async def _renewal_loop(self) -> None:
        while True:
            credentials = self.credentials
            lifetime = (credentials.not_after - credentials.not_before).total_seconds()
            with trio.move_on_after(min(30.0, max(1.0, lifetime / 20))):
                await self._trust_changed.wait()
            self._trust_changed = trio.Event()
            credentials = self.credentials
            # During a CA rotation, a certificate from the previous CA is re-issued at once.
            if not credentials.needs_renewal(datetime.now(UTC)) and credentials.issued_by_active_ca:
                continue
            try:
                await self.renew_certificate()
            except CloudlessError as exc:
                log.warning("node.renewal_failed", extra={"fields": {"error": str(exc)}})

    async def renew_certificate(self) -> None:
        key = new_private_key()
        csr = make_csr(key, self.credentials.identity)
        leader = await self.replicated.wait_leader()
        address = self.address_of(leader)
        if address is None:
            raise CloudlessError(f"no address for leader {leader}")
        reply = await self.rpc.call(
            address,
            "pki.renew",
            RenewRequest(csr.public_bytes(serialization.Encoding.PEM)),
            response=RenewReply,
            timeout=10.0,
        )
        bundle = self.credentials.ca_pem
        if reply.ca_pem and reply.ca_pem != bundle:
            try:  # a CA we do not trust yet only with an endorsement, as in _sync_trust
                bundle = accept_offered_bundle(bundle, reply.ca_pem, self.cluster_id, reply.endorsement)
            except InvalidCredentials as exc:
                log.warning("node.renewal_bundle_refused", extra={"fields": {"error": str(exc)}})
        fresh = Credentials(bundle, reply.cert_pem, private_key_pem(key))
        fresh.save(self.data.tls)
        self.credentials = fresh
        self.verifier.trust(fresh.ca_certificates)
        for carrier in (self.tls, self.quic):
            carrier.update_credentials(fresh)
        self.events.record("node.certificate_renewed", self.node_id, f"serial {fresh.serial:x}")
        # Re-sign our gossip claims with the new key (a metadata version bump).
        await self.gossip.update_metadata(self.metadata())

    async def _metadata_loop(self) -> None:
        last = None
        while True:
            await trio.sleep(1.0)
            self.device = self._detect_device()
            meta = self.metadata()
            if meta != last:
                await self.gossip.update_metadata(meta)
                last = meta

    async def _signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                log.info("node.stopping", extra={"fields": {"node": self.node_id}})
                self.stopping.set()
                return

    async def _leave_gracefully(self) -> None:
        """Hand leadership away, then tell gossip we are leaving (deadline-bound)."""
        replicated = self.replicated
        with trio.move_on_after(3.0):
            if replicated.is_leader:
                voters = [v for v in replicated.core.conf_state.voters if v != self.node_id]
                if voters:
                    replicated.driver.transfer_leadership(voters[0])
                    with trio.move_on_after(1.5):
                        await replicated.wait_leadership(False)
            await self.gossip.leave(timeout=1.0)

    def stop(self) -> None:
        self.stopping.set()

    # -- bootstrap completion (called by the coordinator once leader) ---------------

    def bootstrap_pending(self) -> BootstrapPending | None:
        path = self.data.root / BOOTSTRAP_PENDING_FILE
        if not path.exists():
            return None
        return msgspec.msgpack.decode(path.read_bytes(), type=BootstrapPending)

    async def complete_bootstrap(self) -> None:
        """Put the CA, the gossip keyring and this node into Raft (idempotent)."""
        pending = self.bootstrap_pending()
        replicated = self.replicated
        if pending is None:
            return
        fsm = replicated.fsm
        if fsm.ca is None:
            await replicated.propose(StoreClusterCA(pending.cluster_id, pending.ca_cert_pem, pending.ca_sealed_key))
        if not fsm.gossip_keys:
            await replicated.propose(SetGossipKeyring([pending.gossip_key]))
        if self.node_id not in fsm.nodes:
            await replicated.propose(self.register_command(self.credentials))
        if pending.admin_serial and "admin" not in fsm.clients:
            await replicated.propose(
                RecordClientCertificate("admin", "admin", pending.admin_serial, pending.admin_not_after)
            )
        (self.data.root / BOOTSTRAP_PENDING_FILE).unlink(missing_ok=True)
        log.info("node.bootstrap_committed", extra={"fields": {"node": self.node_id}})

    def register_command(self, credentials: Credentials) -> RegisterNode:
        return RegisterNode(
            node_id=self.node_id,
            address=format_address(self.advertise),
            certificate_serial=format(credentials.serial, "x"),
            certificate_not_after=credentials.not_after.timestamp(),
            region=self.options.region,
            zone=self.options.zone,
            labels=dict(self.options.labels),
            trusted=True,  # the bootstrap node: it made the CA
            public_key=public_key_der(credentials),
        )

    def signing_ca(self) -> ClusterCA:
        """The cluster CA with its key, on a node trusted to coordinate; else a clear refusal."""
        record = self.replicated.fsm.ca
        if record is None:
            raise Unavailable("the cluster CA is not committed yet; retry shortly")
        kek = load_kek(self.data.root)
        if kek is None:
            raise Unavailable(
                f"node {self.node_id} is not trusted to coordinate, so it holds no CA key "
                "(enroll it with a `token create --trust coordinator` token)"
            )
        certificate_pem = record.certificate_pem
        fingerprint = certificate_fingerprint(x509.load_pem_x509_certificate(certificate_pem))
        key_pem = open_ca_key(kek, record.sealed_key, record.cluster_id, fingerprint)
        return ClusterCA.from_pem(certificate_pem, key_pem)
