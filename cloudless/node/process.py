"""`cloudless node`: one trio nursery running every service of a device.

    Node.run
    ├── UdpEndpoint          one UDP socket: QUIC and sealed gossip, split by first byte
    ├── TlsCarrier.serve     TCP on the same port number: TLS 1.3 (mTLS, or enrollment)
    ├── QuicCarrier.serve    QUIC on the UDP socket
    ├── ReplicatedState      Raft driver over RocksDB + the state machine
    ├── GossipDriver         SWIM + Lifeguard membership with this device's metadata
    ├── Coordinator          on the Raft leader only: autopilot, CA duties
    ├── revocation sync      keeps the verifier's revocation list current
    └── certificate renewal  renews this node's certificate at two-thirds of its life

Every service is started with `nursery.start`; a node answers requests only
once all of them are up. SIGTERM leaves gossip gracefully and hands Raft
leadership away first.
"""

from __future__ import annotations

import functools
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

import msgspec
import trio
from cryptography import x509

from cloudless.api.client_config import ClientConfig, Context
from cloudless.authz import CallGate, ProofVerifier, is_listed
from cloudless.coordinator.autopilot import AutopilotConfig
from cloudless.durable import write_atomic
from cloudless.errors import CloudlessError, InvalidInput, Unavailable
from cloudless.gossip.core import GossipConfig, GossipCore
from cloudless.gossip.driver import GossipDriver
from cloudless.gossip.keyring import Keyring, PacketSealer
from cloudless.gossip.metadata import Metadata, Resources
from cloudless.node.datadir import DataDir, NodeRecordFile, new_node_id, validate_node_name
from cloudless.node.device import DeviceProfile, detect, detect_runtime, runtime_labels
from cloudless.node.events import EventLog
from cloudless.node.gossip_identity import GossipIdentity, decode_reply, install_keyring, keys_reply, public_key_der
from cloudless.node.replicated import ReplicatedState
from cloudless.observability.metrics import NodeMetrics
from cloudless.pki.bundle import accept_offered_bundle
from cloudless.pki.ca import ClusterCA, certificate_fingerprint
from cloudless.pki.credentials import Credentials, issue_credentials, make_csr, new_private_key, private_key_pem
from cloudless.pki.custody import load_kek, new_kek, open_ca_key, save_kek, seal_ca_key
from cloudless.pki.errors import InvalidCredentials
from cloudless.pki.identity import Identity
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
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
    from cloudless.api.client_config import parse_endpoint

    return parse_endpoint(text)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Node:
    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.data = DataDir(options.data_dir)
        self.metrics = NodeMetrics(lambda: self)
        self.events = EventLog()
        self.device: DeviceProfile = detect(options.power, options.battery, options.network, options.device_class)  # type: ignore[arg-type]
        # Decided once: the agent is built for it, and gossip advertises it so
        # the scheduler never places a container where it cannot run.
        self.runtime, self.runtime_reason = detect_runtime(
            options.runtime or os.environ.get("CLOUDLESS_RUNTIME") or None, data_dir=self.data.root
        )
        self.runtime_labels = runtime_labels(self.runtime)
        self.started_at = time.time()
        self.stopping = trio.Event()
        self.ready = trio.Event()
        self.node_id = ""
        self.cluster_id = ""
        self.advertise: tuple[str, int] = options.advertise or options.listen
        self.credentials: Credentials | None = None
        self.revocations = RevocationList()
        self.live = LiveConnections()
        self._revocations_changed = trio.Event()
        self.verifier: PeerVerifier | None = None
        self._trust_changed = trio.Event()  # the CA bundle changed: the renewal loop looks at once
        self.replicated: ReplicatedState | None = None
        self.gossip: GossipDriver | None = None
        self.gossip_identity: GossipIdentity | None = None
        self.tls: TlsCarrier | None = None
        self.quic: QuicCarrier | None = None
        self.rpc: RpcClient | None = None
        self.endpoint: UdpEndpoint | None = None
        self.coordinator = None
        self.server = RpcServer(listed=is_listed, max_calls_per_peer=MAX_CALLS_PER_IDENTITY)
        # Enrollment requests are small (a CSR and a token): a small frame cap
        # bounds what an unauthenticated peer can make us buffer.
        self.enroll_server = RpcServer(listed=is_listed, max_frame_size=64 * 1024, request_timeout=5.0)
        self.blobs = None  # cloudless.blobs.cluster.BlobNode, once run_blobs is up

    # -- identity ------------------------------------------------------------------

    async def _enroll_if_needed(self) -> None:
        opts = self.options
        self.data.create()
        if self.data.is_enrolled():
            if opts.join and opts.token:
                log.info("node.already_enrolled", extra={"fields": {"data_dir": str(self.data.root)}})
            return
        name = validate_node_name(opts.name) if opts.name else new_node_id()
        if opts.join is None:
            self._bootstrap(name)
            if opts.on_bootstrapped is not None:
                opts.on_bootstrapped(self.data.admin_config)
            return
        if not opts.token:
            raise InvalidInput("--join needs --token (create one with `cloudless token create`)", field="token")
        from cloudless.node.enroll import enroll

        credentials, reply = await enroll(
            opts.join,
            opts.token,
            name=name,
            advertise=format_address(self.advertise),
            region=opts.region,
            zone=opts.zone,
            labels=opts.labels,
        )
        credentials.save(self.data.tls)
        if reply.ca_kek:
            save_kek(self.data.root, reply.ca_kek)
        write_atomic(self.data.root / GOSSIP_KEYS_FILE, msgspec.msgpack.encode(reply.gossip_keys))
        write_atomic(self.data.root / "seeds", msgspec.msgpack.encode(reply.seeds))
        write_atomic(self.data.root / "revocations", reply.revocations)
        self.data.save_record(NodeRecordFile(name, reply.cluster_id, format_address(self.advertise)))
        self.events.record(
            "node.joined", name, f"joined cluster {reply.cluster_id} through {format_address(opts.join)}"
        )

    def _bootstrap(self, name: str) -> None:
        """Create a cluster: CA, this node as its only voter, an admin client config."""
        now = datetime.now(UTC)
        cluster_id = f"c-{secrets.token_hex(4)}"
        ca = ClusterCA.create(cluster_id, now)
        from cloudless.node.enroll_service import node_certificate_lifetime

        credentials = issue_credentials(ca, Identity(cluster_id, "node", name), now, node_certificate_lifetime())
        credentials.save(self.data.tls)
        cert_pem, key_pem = ca.to_pem()
        kek = new_kek()
        save_kek(self.data.root, kek)
        sealed_key = seal_ca_key(kek, key_pem, cluster_id, ca.fingerprint)
        del key_pem
        gossip_key = os.urandom(32)
        admin = issue_credentials(
            ca, Identity(cluster_id, "client", "admin"), now, lifetime=timedelta(days=365), role="admin"
        )
        pending = BootstrapPending(
            cluster_id, cert_pem, sealed_key, gossip_key, format(admin.serial, "x"), admin.not_after.timestamp()
        )
        write_atomic(self.data.root / BOOTSTRAP_PENDING_FILE, msgspec.msgpack.encode(pending))
        write_atomic(self.data.root / GOSSIP_KEYS_FILE, msgspec.msgpack.encode([gossip_key]))
        ReplicatedState.bootstrap(self.data.raft, name)
        config = ClientConfig(
            contexts={
                cluster_id: Context(
                    cluster_id,
                    cluster_id,
                    [format_address(self.advertise)],
                    admin.ca_pem,
                    admin.cert_pem,
                    admin.key_pem,
                )
            },
            current_context=cluster_id,
        )
        config.save(self.data.admin_config)
        self.data.save_record(NodeRecordFile(name, cluster_id, format_address(self.advertise)))
        self.events.record("cluster.bootstrapped", name, f"created cluster {cluster_id}")
        log.info("node.bootstrapped", extra={"fields": {"cluster": cluster_id, "node": name}})

    # -- lookups -------------------------------------------------------------------

    def address_of(self, node_id: str) -> tuple[str, int] | None:
        replicated = self.replicated
        if replicated is not None:
            record = replicated.fsm.nodes.get(node_id)
            if record is not None:
                return parse_address(record.address)
        if self.gossip is not None:
            member = self.gossip.core.member(node_id)
            if member is not None:
                return parse_address(member.addr)
        return None

    def leader_hint(self) -> str | None:
        """The leader as gossip reports it, for nodes outside the Raft configuration."""
        if self.gossip is None:
            return None
        for member in self.gossip.core.live_members():
            if "leader" in member.meta.roles:
                return member.name
        return None

    def metadata(self) -> Metadata:
        roles: list[str] = []
        if self.replicated is not None:
            conf = self.replicated.core.conf_state
            if self.node_id in conf.voters:
                roles.append("voter")
            elif self.node_id in conf.learners:
                roles.append("learner")
            if self.replicated.is_leader:
                roles.append("leader")
        from cloudless.node.device import ARCH_LABEL, CLASS_LABEL

        d = self.device
        blob_total, blob_free = self.blobs.disk() if self.blobs is not None else (0, 0)
        network = {"wired": "wired", "wifi": "wifi", "metered": "cellular"}[d.network]
        return Metadata(
            region=self.options.region,
            zone=self.options.zone,
            labels=dict(self.options.labels)
            | (self.blobs.labels() if self.blobs is not None else {})
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
        await self._enroll_if_needed()
        record = self.data.load_record()
        self.node_id, self.cluster_id = record.node_id, record.cluster_id
        if self.options.advertise is None and record.advertise:
            self.advertise = parse_address(record.advertise)
        self.credentials = Credentials.load(self.data.tls)
        revocations_file = self.data.root / "revocations"
        if revocations_file.exists():
            self.revocations.install(RevocationList.from_bytes(revocations_file.read_bytes()))
        verifier = self.verifier = PeerVerifier(self.credentials.ca_certificates, self.revocations, self.cluster_id)
        # Default deny on every call: authz's permission table, with forwarded
        # client calls authorized by the client's own signed proof.
        gate = CallGate(ProofVerifier(verifier))
        self.server.authorize = gate
        self.enroll_server.authorize = gate

        if self.options.listen[1] == 0:
            raise InvalidInput("--listen needs an explicit port: UDP and TCP must share it", field="listen")
        endpoint = self.endpoint = UdpEndpoint(*self.options.listen)
        self.tls = TlsCarrier(self.credentials, verifier, bind=self.options.listen, enrollment=True)
        self.rpc = RpcClient(self.tls)
        replicated = self.replicated = ReplicatedState(
            self.node_id,
            self.data.raft,
            self.rpc,
            self.address_of,
            tick_interval=self.options.tick_interval,
            election_tick=self.options.election_tick,
            heartbeat_tick=self.options.heartbeat_tick,
            clock=time.time,
            leader_hint=self.leader_hint,
        )
        replicated.register(self.server)
        replicated.change_listeners.append(self._on_state_change)
        self._refresh_revocations()

        from cloudless.api.ca import CAApi
        from cloudless.api.identities import IdentityApi
        from cloudless.api.service import ApiService
        from cloudless.node.coordinator import Coordinator
        from cloudless.node.enroll_service import EnrollService

        api = ApiService(self)
        api.register(self.server)
        IdentityApi(self).register(self.server)
        CAApi(self).register(self.server)
        enroll_service = EnrollService(self)
        enroll_service.register(self.enroll_server, self.server)
        self.server.unary("gossip.stream")(self._serve_gossip_stream)
        self.server.unary("gossip.keys")(self._serve_gossip_keys)

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(endpoint.run)
                self.quic = QuicCarrier(self.credentials, verifier, endpoint=endpoint)
                await nursery.start(self.tls.serve, self._on_connection)
                await nursery.start(self.quic.serve, self._on_connection)
                await nursery.start(replicated.run)
                await nursery.start(self._run_gossip)
                coordinator = self.coordinator = Coordinator(self)
                await nursery.start(coordinator.run)
                from cloudless.agent.boot import run_workloads  # agent, workload controller, workload API

                await nursery.start(run_workloads, self)
                from cloudless.blobs.cluster import run_blobs  # chunk store, S3 gateway, anti-entropy

                await nursery.start(functools.partial(run_blobs, self, s3_listen=self.options.s3_listen))
                nursery.start_soon(self._revocation_sync)
                nursery.start_soon(self._cut_revoked_connections)
                nursery.start_soon(self._renewal_loop)
                nursery.start_soon(self._metadata_loop)
                if self.options.metrics_listen is not None:
                    from cloudless.api.http import metrics_app, serve_https

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
            replicated.close()

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
            if peer.kind == "node" and self.gossip is not None and not self.stopping.is_set():
                self.gossip.hint_unreachable(peer.name)

    async def _run_gossip(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        keys = self._gossip_keys()
        sealer = PacketSealer(Keyring(keys[0], keys[1:]))
        # A member's alive/leave is signed with its node key and checked against
        # the keys Raft recorded for it: the shared keyring alone forges nothing.
        replicated = self.replicated
        self.gossip_identity = GossipIdentity(
            self.cluster_id, self._current_credentials, lambda: replicated.fsm if replicated else None, self._in_raft
        )
        core = GossipCore(
            self.node_id,
            format_address(self.advertise),
            rng=random.Random(),
            now=trio.current_time(),
            config=GossipConfig(),
            meta=self.metadata(),
            claims=self.gossip_identity.claims(),
        )
        self.gossip = GossipDriver(core, self.endpoint, sealer, self._gossip_exchange)
        self.gossip.add_listener(self._on_member_event)
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
        assert self.gossip is not None
        while True:
            await trio.sleep(2.0)
            if len(self.gossip.core.live_members()) > 1:
                continue
            seeds = self._seeds()
            if seeds:
                await self.gossip.join(seeds)

    def _gossip_keys(self) -> list[bytes]:
        replicated = self.replicated
        if replicated is not None and replicated.fsm.gossip_keys:
            return list(replicated.fsm.gossip_keys)
        path = self.data.root / GOSSIP_KEYS_FILE
        return list(msgspec.msgpack.decode(path.read_bytes(), type=list[bytes]))

    def _seeds(self) -> list[str]:
        seeds: list[str] = []
        if self.options.join is not None:
            seeds.append(format_address(self.options.join))
        path = self.data.root / "seeds"
        if path.exists():
            seeds.extend(msgspec.msgpack.decode(path.read_bytes(), type=list[str]))
        if self.replicated is not None:
            seeds.extend(r.address for n, r in self.replicated.fsm.nodes.items() if n != self.node_id)
        own = format_address(self.advertise)
        return sorted({s for s in seeds if s != own})

    async def _gossip_exchange(self, addr: str, request: bytes) -> bytes:
        assert self.rpc is not None
        return await self.rpc.call(parse_address(addr), "gossip.stream", request, timeout=5.0)

    def _current_credentials(self) -> Credentials:
        assert self.credentials is not None  # loaded before any service starts
        return self.credentials

    def _in_raft(self) -> bool:
        replicated = self.replicated
        if replicated is None:
            return False
        conf = replicated.core.conf_state
        return self.node_id in conf.voters or self.node_id in conf.learners

    async def _serve_gossip_keys(self, ctx, body: bytes) -> bytes:
        replicated = self.replicated
        if ctx.peer.kind != "node" or replicated is None:
            raise CloudlessError("gossip keys are for nodes")
        return msgspec.msgpack.encode(keys_reply(replicated.fsm, ctx.peer.name))

    async def _sync_gossip_keys(self, address: tuple[str, int]) -> None:
        """A node outside Raft fetches the keyring and members' keys with the revocations."""
        assert self.rpc is not None
        try:
            reply = decode_reply(await self.rpc.call(address, "gossip.keys", b"", timeout=3.0))
        except (CloudlessError, msgspec.DecodeError) as exc:
            log.debug("node.gossip_keys_sync_failed", extra={"fields": {"error": str(exc)}})
            return
        if self.gossip_identity is not None:
            self.gossip_identity.install_synced(reply)
        self._install_gossip_keys(reply.keyring)

    def _install_gossip_keys(self, keys: list[bytes]) -> None:
        if self.gossip is not None and install_keyring(self.gossip.sealer.keyring, keys):
            write_atomic(self.data.root / GOSSIP_KEYS_FILE, msgspec.msgpack.encode(keys))
            log.info("node.gossip_keyring_installed", extra={"fields": {"keys": len(keys)}})

    async def _serve_gossip_stream(self, ctx, body: bytes) -> bytes:
        if ctx.peer.kind != "node" or self.gossip is None:
            raise CloudlessError("gossip streams are for nodes")
        return await self.gossip.serve_stream(body)

    def _on_member_event(self, event) -> None:
        kind = type(event).__name__
        self.events.record(f"member.{kind.removeprefix('Member').lower()}", event.name, f"{event.name}: {kind}")

    def _on_state_change(self, changes) -> None:
        kinds = {c.kind for c in changes}
        if kinds & {"node", "snapshot"} and self.replicated is not None:
            # Known members' addresses, so a restart can rejoin gossip before
            # the Raft log is replayed (or when this node is outside Raft).
            own = format_address(self.advertise)
            known = sorted(r.address for r in self.replicated.fsm.nodes.values() if r.address != own)
            if known:
                write_atomic(self.data.root / "seeds", msgspec.msgpack.encode(known))
        if kinds & {"revocation", "node", "snapshot"}:
            self._refresh_revocations()
        if kinds & {"ca", "snapshot"} and self.replicated is not None:
            self._install_trust(self.replicated.fsm.trust_bundle())
        if kinds & {"gossip_keys", "snapshot"} and self.gossip is not None and self.replicated is not None:
            keys = self.replicated.fsm.gossip_keys
            if keys:
                self._install_gossip_keys(list(keys))  # the running keyring, and its copy in the data dir

    def _install_trust(self, bundle: bytes) -> None:
        """Trust the CA bundle `bundle` (a CA rotation began, activated or retired): from the
        next handshake on, in the transports, the verifier and `tls/ca.pem`."""
        credentials = self.credentials
        if not bundle or credentials is None or bundle == credentials.ca_pem:
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
        if self.verifier is not None:
            self.verifier.trust(fresh.ca_certificates)
        for carrier in (self.tls, self.quic):
            if carrier is not None:
                carrier.update_credentials(fresh)
        self.events.record("pki.trust_changed", self.node_id, f"{len(fresh.ca_certificates)} CA(s) trusted")
        self._trust_changed.set()

    def _refresh_revocations(self) -> None:
        replicated = self.replicated
        if replicated is None or replicated.fsm.applied_index == 0:
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
            outgoing = self.rpc.pool.connections() if self.rpc is not None else []
            await self.live.close_revoked(self.revocations.is_revoked, outgoing)

    async def _revocation_sync(self) -> None:
        """Nodes outside Raft learn revocations from the leader."""
        while True:
            await trio.sleep(5.0)
            replicated = self.replicated
            if (
                replicated is None
                or self.node_id in replicated.core.conf_state.voters + replicated.core.conf_state.learners
            ):
                continue
            leader = replicated.leader or self.leader_hint()
            address = self.address_of(leader) if leader else None
            if address is None or self.rpc is None:
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
        from cloudless.api.ca import CABundle

        assert self.rpc is not None
        try:
            reply = await self.rpc.call(address, "pki.trust", b"", response=CABundle, timeout=3.0)
            assert self.credentials is not None
            if reply.ca_pem and reply.ca_pem != self.credentials.ca_pem:
                self._install_trust(
                    accept_offered_bundle(self.credentials.ca_pem, reply.ca_pem, self.cluster_id, reply.endorsement)
                )
        except CloudlessError as exc:
            log.debug("node.trust_sync_failed", extra={"fields": {"error": str(exc)}})

    async def _renewal_loop(self) -> None:
        while True:
            credentials = self.credentials
            lifetime = (credentials.not_after - credentials.not_before).total_seconds() if credentials else 300.0
            with trio.move_on_after(min(30.0, max(1.0, lifetime / 20))):
                await self._trust_changed.wait()
            self._trust_changed = trio.Event()
            credentials = self.credentials
            if credentials is None:
                continue
            # During a CA rotation, a certificate from the previous CA is re-issued at once.
            if not credentials.needs_renewal(datetime.now(UTC)) and credentials.issued_by_active_ca:
                continue
            try:
                await self.renew_certificate()
            except CloudlessError as exc:
                log.warning("node.renewal_failed", extra={"fields": {"error": str(exc)}})

    async def renew_certificate(self) -> None:
        from cryptography.hazmat.primitives import serialization

        from cloudless.node.enroll_service import RenewReply, RenewRequest

        assert self.credentials is not None and self.replicated is not None and self.rpc is not None
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
        if self.verifier is not None:
            self.verifier.trust(fresh.ca_certificates)
        for carrier in (self.tls, self.quic):
            if carrier is not None:
                carrier.update_credentials(fresh)
        self.events.record("node.certificate_renewed", self.node_id, f"serial {fresh.serial:x}")
        if self.gossip is not None:
            # Re-sign our gossip claims with the new key (a metadata version bump).
            await self.gossip.update_metadata(self.metadata())

    async def _metadata_loop(self) -> None:
        last = None
        while True:
            await trio.sleep(1.0)
            if self.gossip is None:
                continue
            self.device = detect(
                self.options.power, self.options.battery, self.options.network, self.options.device_class
            )  # type: ignore[arg-type]
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
            if replicated is not None and replicated.is_leader:
                voters = [v for v in replicated.core.conf_state.voters if v != self.node_id]
                if voters:
                    replicated.driver.transfer_leadership(voters[0])
                    with trio.move_on_after(1.5):
                        while replicated.is_leader:
                            await trio.sleep(0.05)
            if self.gossip is not None:
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
        assert replicated is not None and self.credentials is not None
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
        replicated = self.replicated
        record = replicated.fsm.ca if replicated is not None else None
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
