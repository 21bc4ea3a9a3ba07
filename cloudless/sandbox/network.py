"""Container networking: a node bridge, a veth per container, NAT, published ports.

Layout (defaults; every name is configurable so several nodes or test runs
can share one machine):

- bridge `cl0` holding the gateway address (`.1`) of the node's subnet
  (`10.88.0.0/24`); these addresses exist only inside this machine;
- per container a named network namespace `<tag>-<id>` (created with
  `ip netns add`, handed to runc as the namespace path) with `eth0`, one end
  of a veth pair whose host end is enslaved to the bridge;
- addresses allocated from the subnet and persisted in `allocations.json`
  (fsynced before use), so a restarted node knows which address is whose;
- egress: iptables MASQUERADE for the subnet leaving by any other interface;
- published ports: iptables DNAT in nat/PREROUTING (traffic from outside) and
  nat/OUTPUT (traffic from this host, including 127.0.0.1). Loopback-origin
  traffic needs `route_localnet` on the bridge plus a MASQUERADE of
  127.0.0.0/8 leaving by the bridge (the container cannot answer 127.0.0.1).
  We chose kernel DNAT over a userspace proxy: no copy through Python, no
  proxy task to supervise, and it survives a node restart untouched. A
  hairpin MASQUERADE lets a container reach its own published port.

Several nodes on one machine (a dev cluster) must each get their own
BridgeConfig (bridge name, subnet, tag): the tag scopes `sweep()`, so two
nodes sharing one would sweep each other's containers. `RuncRuntime`'s
default, `BridgeConfig.for_node(state_dir)`, derives all of them from the
node's state directory.

Every rule carries an iptables comment: `<tag>` for the bridge's own rules and
`<tag>:<id>` for a container's, so `sweep()` can find and delete leftovers of
containers that no longer exist without touching anyone else's rules.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from cloudless.sandbox.runtime import NetworkSetupFailed, PortInUse, PortMapping

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
_COMMENT = re.compile(r'--comment "?([^"\s]+)"?')


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    bridge: str = "cl0"
    subnet: str = "10.88.0.0/24"
    tag: str = "cloudless"  # netns prefix and iptables comment tag
    veth_prefix: str = "clv"  # host-side veth names: prefix + hash (<= 15 chars)

    @classmethod
    def for_node(cls, state_dir: Path, network_range: str = "10.88.0.0/16") -> BridgeConfig:
        """A default that two nodes on one machine never share: names from a hash of the
        state directory, and a /24 of `network_range` picked by it (an agent with a
        cluster-assigned subnet passes its own config instead)."""
        digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()
        subnets = list(ipaddress.ip_network(network_range).subnets(new_prefix=24)) or [
            ipaddress.ip_network(network_range)
        ]
        subnet = subnets[int(digest[:8], 16) % len(subnets)]
        return cls(bridge=f"cl{digest[:6]}", subnet=str(subnet), tag=f"cl{digest[:6]}", veth_prefix=f"v{digest[:3]}")


class Attachment(msgspec.Struct, frozen=True):
    container_id: str
    netns: str
    ip: str
    gateway: str
    prefixlen: int
    host_veth: str
    ports: list[PortMapping] = []

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"


class AddressPool:
    """Which host addresses of a subnet are taken; the gateway (.1) is never handed out."""

    def __init__(self, subnet: str, taken: set[str]) -> None:
        self.network = ipaddress.ip_network(subnet)
        self.gateway = str(next(self.network.hosts()))
        self.taken = set(taken)

    def allocate(self) -> str:
        for host in self.network.hosts():
            addr = str(host)
            if addr != self.gateway and addr not in self.taken:
                self.taken.add(addr)
                return addr
        raise NetworkSetupFailed(f"no free address in {self.network}", subnet=str(self.network))

    def release(self, addr: str) -> None:
        self.taken.discard(addr)


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _kernel_listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _sysctl_write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


async def run_command(argv: list[str], *, stdin: bytes | None = None, timeout: float = 15.0, check: bool = True) -> str:
    """Run a host tool with a deadline; raise NetworkSetupFailed with its stderr."""
    with trio.move_on_after(timeout) as scope:
        proc = await trio.run_process(argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    if scope.cancelled_caught:
        raise NetworkSetupFailed(f"{argv[0]} timed out after {timeout}s", command=" ".join(argv))
    if check and proc.returncode != 0:
        raise NetworkSetupFailed(
            f"{' '.join(argv[:4])} failed: {proc.stderr.decode(errors='replace').strip()}",
            command=" ".join(argv),
            returncode=proc.returncode,
        )
    return proc.stdout.decode(errors="replace")


class BridgeNetwork:
    """The node bridge and its per-container attachments."""

    def __init__(self, state_dir: Path, config: BridgeConfig = BridgeConfig(), timeout: float = 15.0) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._alloc_path = self.state_dir / "allocations.json"
        self._attachments: dict[str, Attachment] = self._load()
        self._pool = AddressPool(config.subnet, {a.ip for a in self._attachments.values()})
        self._lock = trio.Lock()  # allocations file and iptables batches
        self._bridge_lock = trio.Lock()
        self._bridge_ready = False

    # ------------------------------------------------------------ persistence

    def _load(self) -> dict[str, Attachment]:
        try:
            raw = self._alloc_path.read_bytes()
        except FileNotFoundError:
            return {}
        return msgspec.json.decode(raw, type=dict[str, Attachment])

    def _persist(self) -> None:
        tmp = self._alloc_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(self._attachments))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self._alloc_path)
        dfd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def attachment(self, container_id: str) -> Attachment | None:
        return self._attachments.get(container_id)

    def attachments(self) -> dict[str, Attachment]:
        return dict(self._attachments)

    # ------------------------------------------------------------ names

    def netns_name(self, container_id: str) -> str:
        return f"{self.config.tag}-{container_id}"

    def veth_name(self, container_id: str) -> str:
        digest = hashlib.sha256(f"{self.config.tag}/{container_id}".encode()).hexdigest()
        return (self.config.veth_prefix + digest)[:15]

    def _comment(self, container_id: str | None = None) -> str:
        return self.config.tag if container_id is None else f"{self.config.tag}:{container_id}"

    # ------------------------------------------------------------ bridge

    def _bridge_rules(self) -> dict[str, list[str]]:
        c = self.config
        tag = f'-m comment --comment "{self._comment()}"'
        return {
            "nat": [
                f"-A POSTROUTING -s {c.subnet} ! -o {c.bridge} {tag} -j MASQUERADE",
                f"-A POSTROUTING -s 127.0.0.0/8 -o {c.bridge} {tag} -j MASQUERADE",
            ],
            "filter": [
                f"-A FORWARD -i {c.bridge} {tag} -j ACCEPT",
                f"-A FORWARD -o {c.bridge} {tag} -j ACCEPT",
            ],
        }

    async def ensure_bridge(self) -> None:
        """Create the bridge, its address and rules if missing (idempotent, concurrency-safe)."""
        if self._bridge_ready:
            return
        async with self._bridge_lock:
            if not self._bridge_ready:
                await self._create_bridge()
                self._bridge_ready = True

    async def _create_bridge(self) -> None:
        c = self.config
        net = ipaddress.ip_network(c.subnet)
        gateway = self._pool.gateway
        if not _link_exists(c.bridge):
            # check=False: another node process on this machine may win the race; the
            # address check below fails loudly if the bridge really is missing.
            await run_command(["ip", "link", "add", c.bridge, "type", "bridge"], timeout=self.timeout, check=False)
            log.info("sandbox.bridge_created", extra={"fields": {"bridge": c.bridge, "subnet": c.subnet}})
        addrs = await run_command(["ip", "-j", "addr", "show", "dev", c.bridge], timeout=self.timeout)
        have = {a.get("local") for i in json.loads(addrs or "[]") for a in i.get("addr_info", [])}
        if gateway not in have:
            await run_command(
                ["ip", "addr", "add", f"{gateway}/{net.prefixlen}", "dev", c.bridge], timeout=self.timeout
            )
        await run_command(["ip", "link", "set", c.bridge, "up"], timeout=self.timeout)
        # Published ports reached via 127.0.0.1 are routed to the bridge; the
        # kernel drops such packets unless route_localnet is on for it.
        _sysctl_write(f"/proc/sys/net/ipv4/conf/{c.bridge}/route_localnet", "1")
        # Egress from containers is forwarded traffic (as with Docker).
        _sysctl_write("/proc/sys/net/ipv4/ip_forward", "1")
        async with self._lock:
            await self._delete_rules_tagged({self._comment()})
            await self._restore(self._bridge_rules())

    async def remove_bridge(self) -> None:
        """Remove the bridge and its rules (node decommission, tests)."""
        async with self._lock:
            await self._delete_rules_tagged({self._comment()})
        if _link_exists(self.config.bridge):
            await run_command(["ip", "link", "del", self.config.bridge], timeout=self.timeout)
        self._bridge_ready = False

    # ------------------------------------------------------------ attach / detach

    def _port_rules(self, a: Attachment) -> dict[str, list[str]]:
        tag = f'-m comment --comment "{self._comment(a.container_id)}"'
        nat = []
        for p in a.ports:
            match = f"-p {p.proto} -m addrtype --dst-type LOCAL -m {p.proto} --dport {p.host_port}"
            dnat = f"-j DNAT --to-destination {a.ip}:{p.container_port}"
            nat.append(f"-A PREROUTING {match} {tag} {dnat}")
            nat.append(f"-A OUTPUT {match} {tag} {dnat}")
            nat.append(
                f"-A POSTROUTING -s {a.ip}/32 -d {a.ip}/32 -p {p.proto} -m {p.proto} --dport {p.container_port} {tag} -j MASQUERADE"
            )
        return {"nat": nat} if nat else {}

    async def attach(self, container_id: str, ports: list[PortMapping]) -> Attachment:
        """Give the container a namespace, veth, address and its published ports."""
        await self.ensure_bridge()
        if container_id in self._attachments:
            raise NetworkSetupFailed(f"container {container_id} is already attached", id=container_id)
        net = ipaddress.ip_network(self.config.subnet)
        async with self._lock:
            taken = {(p.host_port, p.proto): cid for cid, att in self._attachments.items() for p in att.ports}
            for p in ports:
                if (p.host_port, p.proto) in taken:
                    owner = taken[(p.host_port, p.proto)]
                    raise PortInUse(
                        f"host port {p.host_port}/{p.proto} is published by {owner}", port=p.host_port, owner=owner
                    )
            ip = self._pool.allocate()
            a = Attachment(
                container_id=container_id,
                netns=self.netns_name(container_id),
                ip=ip,
                gateway=self._pool.gateway,
                prefixlen=net.prefixlen,
                host_veth=self.veth_name(container_id),
                ports=list(ports),
            )
            self._attachments[container_id] = a
            self._persist()  # recorded before anything exists, so a crash leaves a sweepable trace
        try:
            await self._plumb(a)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.detach(container_id)
            raise
        log.info("sandbox.network_attached", extra={"fields": {"id": container_id, "ip": a.ip, "ports": len(a.ports)}})
        return a

    async def _plumb(self, a: Attachment) -> None:
        # Two `ip` processes in all: the peer is born inside the namespace as eth0.
        host_batch = (
            f"netns add {a.netns}\n"
            f"link add {a.host_veth} type veth peer name eth0 netns {a.netns}\n"
            f"link set {a.host_veth} master {self.config.bridge} up\n"
        )
        await run_command(["ip", "-batch", "-"], stdin=host_batch.encode(), timeout=self.timeout)
        ns_batch = (
            f"addr add {a.ip}/{a.prefixlen} dev eth0\n"
            "link set eth0 up\n"
            "link set lo up\n"
            f"route add default via {a.gateway}\n"
        )
        await run_command(["ip", "-n", a.netns, "-batch", "-"], stdin=ns_batch.encode(), timeout=self.timeout)
        if a.ports:
            async with self._lock:
                await self._restore(self._port_rules(a))

    async def ensure_attached(self, container_id: str, ports: list[PortMapping]) -> Attachment:
        """Re-plumb a recorded attachment whose namespace is gone (the machine rebooted:
        /run/netns, links and rules do not survive), keeping its address and ports;
        attach afresh if the record itself was lost."""
        a = self._attachments.get(container_id)
        if a is None:
            return await self.attach(container_id, ports)
        if os.path.exists(a.netns_path) and _link_exists(a.host_veth):
            return a
        await self.ensure_bridge()
        if os.path.exists(a.netns_path):
            await run_command(["ip", "netns", "del", a.netns], timeout=self.timeout, check=False)
        if _link_exists(a.host_veth):
            await run_command(["ip", "link", "del", a.host_veth], timeout=self.timeout, check=False)
        # The kernel tears down a deleted namespace's links asynchronously; the name must be free.
        with trio.move_on_after(self.timeout):
            while _link_exists(a.host_veth):
                await trio.sleep(0.02)
        async with self._lock:
            await self._delete_rules_tagged({self._comment(container_id)})
        await self._plumb(a)
        log.info("sandbox.network_restored", extra={"fields": {"id": container_id, "ip": a.ip}})
        return a

    async def detach(self, container_id: str, *, sweep_rules: bool = False) -> None:
        """Remove the container's namespace, veth, rules and address; safe to repeat.

        Rules are looked for only if the attachment publishes ports, or with
        `sweep_rules` (leftovers found by their tag), so detaching a container
        that never had a bridge costs nothing.
        """
        a = self._attachments.get(container_id)
        netns = a.netns if a else self.netns_name(container_id)
        veth = a.host_veth if a else self.veth_name(container_id)
        # The veth first: deleting it is synchronous (and takes the peer along), whereas a
        # deleted namespace's links go away later, which would block reusing the name.
        if _link_exists(veth):
            await run_command(["ip", "link", "del", veth], timeout=self.timeout, check=False)
        if os.path.exists(f"{NETNS_DIR}/{netns}"):
            await run_command(["ip", "netns", "del", netns], timeout=self.timeout, check=False)
        async with self._lock:
            if sweep_rules or (a is not None and a.ports):
                await self._delete_rules_tagged({self._comment(container_id)})
            if a is not None:
                self._pool.release(a.ip)
                del self._attachments[container_id]
                self._persist()
        log.info("sandbox.network_detached", extra={"fields": {"id": container_id}})

    async def sweep(self, keep: set[str]) -> list[str]:
        """Remove every namespace, veth, rule and address of containers not in `keep`.

        Returns the container ids cleaned up.
        """
        gone: set[str] = {cid for cid in self._attachments if cid not in keep}
        prefix = f"{self.config.tag}-"
        for name in _kernel_listdir(NETNS_DIR):
            if name.startswith(prefix) and name[len(prefix) :] not in keep:
                gone.add(name[len(prefix) :])
        for tagged in await self._tagged_comments():
            if tagged.startswith(f"{self.config.tag}:") and tagged.split(":", 1)[1] not in keep:
                gone.add(tagged.split(":", 1)[1])
        for cid in sorted(gone):
            await self.detach(cid, sweep_rules=True)
        # Host veths on our bridge that belong to nobody we keep.
        kept_veths = {self.veth_name(cid) for cid in keep}
        for veth in _kernel_listdir(f"/sys/class/net/{self.config.bridge}/brif"):
            if veth.startswith(self.config.veth_prefix) and veth not in kept_veths:
                await run_command(["ip", "link", "del", veth], timeout=self.timeout, check=False)
        if gone:
            log.info("sandbox.network_swept", extra={"fields": {"ids": sorted(gone)}})
        return sorted(gone)

    # ------------------------------------------------------------ iptables

    async def _restore(self, rules: dict[str, list[str]]) -> None:
        if not rules:
            return
        text = "".join(f"*{table}\n" + "".join(r + "\n" for r in lines) + "COMMIT\n" for table, lines in rules.items())
        await run_command(["iptables-restore", "--noflush"], stdin=text.encode(), timeout=self.timeout)

    async def _saved_rules(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for table in ("nat", "filter"):
            text = await run_command(["iptables-save", "-t", table], timeout=self.timeout)
            out[table] = [line for line in text.splitlines() if line.startswith("-A ")]
        return out

    async def _tagged_comments(self) -> set[str]:
        found = set()
        for lines in (await self._saved_rules()).values():
            for line in lines:
                m = _COMMENT.search(line)
                if m and (m.group(1) == self.config.tag or m.group(1).startswith(self.config.tag + ":")):
                    found.add(m.group(1))
        return found

    async def _delete_rules_tagged(self, comments: set[str]) -> None:
        deletions: dict[str, list[str]] = {}
        for table, lines in (await self._saved_rules()).items():
            for line in lines:
                m = _COMMENT.search(line)
                if m and m.group(1) in comments:
                    deletions.setdefault(table, []).append("-D" + line[2:])
        await self._restore(deletions)
