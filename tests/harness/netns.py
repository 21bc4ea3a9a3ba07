"""Test hosts as Linux network namespaces on one bridge, with iptables faults.

Each run creates, in the root namespace, a bridge `clx<run>br` holding the
gateway address `.254` of a private /24 chosen for the run (10.200-254.x.0,
checked against every route on the machine); each host is a namespace
`clx<run>-<i>` whose `eth0` (address `.<i+1>`) is one end of a veth pair whose
other end, `clx<run>v<i>`, is enslaved to the bridge. Hosts have no default
route, so nothing they send can leave the machine; processes in the root
namespace (test clients) reach every host through the bridge.

Faults are iptables rules INSIDE each host's namespace, so they vanish with
it: INPUT and OUTPUT jump to `CLX-PART` (partitions, one-way drops; `-s`
rules only match on INPUT, `-d` rules only on OUTPUT) and to `CLX-LOSS-IN` /
`CLX-LOSS-OUT` (random loss, `-m statistic --mode random`). Loopback is never
touched. The kernel has no netem, so there is no delay or reordering fault.

iptables: both iptables-nft and iptables-legacy work inside a namespace on
the reference machine (kernel 6.18, Debian iptables 1.8.9); the first that
accepts a statistic-match rule in a fresh namespace is used, nft first
(`CLOUDLESS_IPTABLES` overrides). With `bridge-nf-call-iptables=1`, bridged
frames also cross the root namespace's FORWARD chain; only if its policy is
not ACCEPT do we insert an ACCEPT for our bridge (tagged, removed at teardown).

Cleanup: a record `/run/cloudless-chaos/<run>.json` naming the owner pid is
written (under a lock) before anything exists. Teardown kills every process
still inside the namespaces, deletes namespaces, links, the root rule and the
record; it runs from the context manager, from `atexit`, and `sweep_stale()`
(called by every new run) removes what runs whose owner died (kill -9) left.
Hosts made by `scripts/netns-hosts up` are recorded as manual and only
`down` removes them.
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cloudless.errors import CloudlessError, InvalidInput

log = logging.getLogger(__name__)

PREFIX = "clx"
RECORD_DIR = Path("/run/cloudless-chaos")
_RUN_ID = re.compile(r"^[0-9a-f]{6}$")
PART_CHAIN = "CLX-PART"
LOSS_IN_CHAIN = "CLX-LOSS-IN"
LOSS_OUT_CHAIN = "CLX-LOSS-OUT"
_IPTABLES_CANDIDATES = ("iptables-nft", "iptables-legacy")


class NetnsError(CloudlessError):
    """A host-setup command failed (ip, iptables) or the machine cannot host namespaces."""


class TeardownIncomplete(NetnsError):
    """Some namespace, link or rule could not be removed."""


@dataclass(frozen=True, slots=True)
class Host:
    index: int
    netns: str
    ip: str
    veth: str  # the root-namespace end of its veth pair

    @property
    def name(self) -> str:
        return f"host{self.index}"


@dataclass(frozen=True, slots=True)
class RuleCounter:
    chain: str
    rule: str  # the rule as iptables-save prints it, without the counters
    packets: int
    bytes: int


@dataclass
class _HostFaults:
    part: list[str] = field(default_factory=list)  # rules of CLX-PART
    loss_in: float = 0.0
    loss_out: float = 0.0
    loss_rule_in: bool = False  # a loss rule is installed (even at p=0)
    loss_rule_out: bool = False


def _command(argv: Sequence[str], *, timeout: float, input: bytes | None = None, check: bool = True) -> str:
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{argv[0]} timed out after {timeout}s", command=" ".join(argv)) from exc
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]} is not installed", command=" ".join(argv)) from exc
    if check and proc.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv[:6])} failed: {proc.stderr.decode(errors='replace').strip()}",
            command=" ".join(argv),
            returncode=proc.returncode,
        )
    return proc.stdout.decode(errors="replace")


def _process_start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks), to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


@contextmanager
def _registry_lock(record_dir: Path) -> Iterator[None]:
    record_dir.mkdir(parents=True, exist_ok=True)
    with open(record_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_records(record_dir: Path) -> dict[str, dict]:
    out = {}
    if not record_dir.is_dir():
        return out
    for path in record_dir.glob("*.json"):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[path.stem] = {}  # torn record: its owner died while writing it
    return out


def _record_alive(record: dict) -> bool:
    if record.get("manual"):
        return True
    pid, start = record.get("pid"), record.get("start_time")
    return isinstance(pid, int) and pid > 0 and _process_start_time(pid) == start


def _write_json_synced(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_netns() -> list[str]:
    out = _command(["ip", "netns", "list"], timeout=10)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links() -> list[str]:
    out = _command(["ip", "-o", "link", "show"], timeout=10)
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _run_of(name: str) -> str | None:
    if not name.startswith(PREFIX):
        return None
    run_id = name[len(PREFIX) : len(PREFIX) + 6]
    return run_id if _RUN_ID.match(run_id) else None


def resources_of_run(run_id: str) -> tuple[list[str], list[str]]:
    """Namespaces and root-namespace links that exist now for `run_id`."""
    netns = [n for n in list_netns() if _run_of(n) == run_id]
    links = [n for n in list_links() if _run_of(n) == run_id]
    return netns, links


def _kill_namespace_processes(netns: str, timeout: float) -> None:
    out = _command(["ip", "netns", "pids", netns], timeout=timeout, check=False)
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _remove_run(run_id: str, record: dict, timeout: float = 10.0) -> list[str]:
    """Remove everything of one run; returns what could not be removed."""
    failures: list[str] = []
    netns, links = resources_of_run(run_id)
    for ns in netns:
        _kill_namespace_processes(ns, timeout)
    for ns in netns:
        try:
            _command(["ip", "netns", "del", ns], timeout=timeout)
        except NetnsError as exc:
            failures.append(f"netns {ns}: {exc.message}")
    # Deleting a namespace destroys its veth end, and the root end with it, asynchronously.
    deadline = time.monotonic() + timeout
    while True:
        links = [n for n in list_links() if _run_of(n) == run_id]
        bridge_only = all(n.endswith("br") for n in links)
        if not links or bridge_only or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for link in sorted(links, key=lambda n: n.endswith("br")):  # veths before the bridge
        try:
            _command(["ip", "link", "del", link], timeout=timeout)
        except NetnsError as exc:
            if link in list_links():
                failures.append(f"link {link}: {exc.message}")
    forward_rule = record.get("forward_rule")
    if forward_rule:
        iptables = record.get("iptables", "iptables")
        _command([iptables, "-w", "-D", "FORWARD", *forward_rule], timeout=timeout, check=False)
    return failures


def sweep_stale(record_dir: Path = RECORD_DIR) -> list[str]:
    """Remove leftovers of runs whose owner process is gone; returns their run ids."""
    with _registry_lock(record_dir):
        records = _read_records(record_dir)
        seen = {_run_of(n) for n in list_netns() + list_links()} - {None}
        stale = sorted(r for r in seen | set(records) if not _record_alive(records.get(r, {})))
        for run_id in stale:
            failures = _remove_run(run_id, records.get(run_id, {}))
            if failures:
                log.warning("netns.sweep_incomplete", extra={"fields": {"run": run_id, "failures": failures}})
                continue
            (record_dir / f"{run_id}.json").unlink(missing_ok=True)
            log.info("netns.swept", extra={"fields": {"run": run_id}})
    return stale


def _routes_in_use() -> list[ipaddress.IPv4Network]:
    out = _command(["ip", "-4", "route", "show", "table", "all"], timeout=10)
    nets = []
    for line in out.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "blackhole", "prohibit", "multicast"):
            word = line.split()[1]
        if word == "default":
            continue
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    return nets


def choose_iptables(netns: str, timeout: float = 10.0) -> str:
    """The iptables variant that can install a statistic-match rule in `netns`."""
    override = os.environ.get("CLOUDLESS_IPTABLES")
    candidates = (override,) if override else _IPTABLES_CANDIDATES
    errors = []
    rule = ["OUTPUT", "-o", "lo", "-m", "statistic", "--mode", "random", "--probability", "0", "-j", "ACCEPT"]
    for candidate in candidates:
        try:
            _command(["ip", "netns", "exec", netns, candidate, "-w", "-A", *rule], timeout=timeout)
            _command(["ip", "netns", "exec", netns, candidate, "-w", "-D", *rule], timeout=timeout)
            return candidate
        except NetnsError as exc:
            errors.append(exc.message)
    raise NetnsError("no iptables variant works inside a network namespace", tried=candidates, errors=errors)


def _as_probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise InvalidInput(f"loss probability must be within [0, 1], got {p}", p=p)
    return p


class NetnsHosts:
    """K hosts on one bridge; a context manager that always tears them down.

    with NetnsHosts(3) as net:
        proc = net.run_in(net.hosts[0], ["python3", "-m", "http.server"])
        net.partition([[0], [1, 2]])
        net.heal()
    """

    def __init__(
        self,
        count: int,
        *,
        run_id: str | None = None,
        timeout: float = 10.0,
        record_dir: Path = RECORD_DIR,
        manual: bool = False,
    ) -> None:
        if not 1 <= count <= 250:
            raise InvalidInput(f"host count must be 1..250, got {count}", count=count)
        if run_id is not None and not _RUN_ID.match(run_id):
            raise InvalidInput(f"run id must be 6 lowercase hex digits, got {run_id!r}", run_id=run_id)
        self.count = count
        self.run_id = run_id or secrets.token_hex(3)
        self.timeout = timeout
        self.record_dir = Path(record_dir)
        self.manual = manual
        self.bridge = f"{PREFIX}{self.run_id}br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway_ip = ""
        self.hosts: list[Host] = []
        self.iptables = ""
        self._forward_rule: list[str] | None = None
        self._faults: dict[int, _HostFaults] = {}
        self._popen: list[subprocess.Popen] = []
        self._created = False
        self._torn_down = False

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> NetnsHosts:
        self.create()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.teardown(raise_errors=exc_type is None)

    @property
    def _record_path(self) -> Path:
        return self.record_dir / f"{self.run_id}.json"

    def _record(self) -> dict:
        pid = os.getpid()
        return {
            "run": self.run_id,
            "pid": 0 if self.manual else pid,
            "start_time": None if self.manual else _process_start_time(pid),
            "manual": self.manual,
            "bridge": self.bridge,
            "subnet": str(self.subnet),
            "iptables": self.iptables,
            "forward_rule": self._forward_rule,
            "hosts": [{"netns": h.netns, "ip": h.ip, "veth": h.veth} for h in self.hosts],
        }

    def create(self) -> None:
        if self._created:
            raise NetnsError("hosts already created", run=self.run_id)
        if os.geteuid() != 0:
            raise NetnsError("network namespaces need root")
        sweep_stale(self.record_dir)
        with _registry_lock(self.record_dir):
            self.subnet = self._choose_subnet()
            hosts = list(self.subnet.hosts())
            self.gateway_ip = str(hosts[-1])
            self.hosts = [
                Host(i, f"{PREFIX}{self.run_id}-{i}", str(hosts[i]), f"{PREFIX}{self.run_id}v{i}")
                for i in range(self.count)
            ]
            # Recorded before anything exists, so a crash at any point leaves a sweepable trace.
            _write_json_synced(self._record_path, self._record())
        self._created = True
        if not self.manual:
            atexit.register(self._teardown_at_exit)
        try:
            self._plumb()
        except BaseException:
            self.teardown(raise_errors=False)
            raise
        log.info(
            "netns.hosts_created",
            extra={
                "fields": {
                    "run": self.run_id,
                    "hosts": self.count,
                    "subnet": str(self.subnet),
                    "iptables": self.iptables,
                }
            },
        )

    def _choose_subnet(self) -> ipaddress.IPv4Network:
        taken = _routes_in_use()
        for record in _read_records(self.record_dir).values():
            if record.get("subnet") and record["subnet"] != "None":
                taken.append(ipaddress.ip_network(record["subnet"]))
        for _ in range(200):
            candidate = ipaddress.ip_network(f"10.{secrets.randbelow(55) + 200}.{secrets.randbelow(256)}.0/24")
            if not any(candidate.overlaps(t) for t in taken):
                return candidate
        raise NetnsError("no free private /24 for test hosts under 10.200.0.0/13")

    def _plumb(self) -> None:
        prefixlen = self.subnet.prefixlen
        _command(["ip", "link", "add", self.bridge, "type", "bridge"], timeout=self.timeout)
        _command(["ip", "addr", "add", f"{self.gateway_ip}/{prefixlen}", "dev", self.bridge], timeout=self.timeout)
        _command(["ip", "link", "set", self.bridge, "up"], timeout=self.timeout)
        for host in self.hosts:
            _command(["ip", "netns", "add", host.netns], timeout=self.timeout)
            _command(
                ["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns],
                timeout=self.timeout,
            )
            _command(["ip", "link", "set", host.veth, "master", self.bridge, "up"], timeout=self.timeout)
            batch = f"link set lo up\naddr add {host.ip}/{prefixlen} dev eth0\nlink set eth0 up\n"
            _command(["ip", "-n", host.netns, "-batch", "-"], input=batch.encode(), timeout=self.timeout)
        self.iptables = choose_iptables(self.hosts[0].netns, self.timeout)
        for host in self.hosts:
            self._faults[host.index] = _HostFaults()
            self._install_chains(host)
        self._open_root_forward()
        with _registry_lock(self.record_dir):
            _write_json_synced(self._record_path, self._record())

    def _open_root_forward(self) -> None:
        """Bridged frames cross the root FORWARD chain when bridge-nf-call-iptables is on."""
        try:
            bridged = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
        except FileNotFoundError:
            bridged = False
        if not bridged:
            return
        rules = _command([self.iptables, "-w", "-S", "FORWARD"], timeout=self.timeout, check=False)
        if "-P FORWARD ACCEPT" in rules and " DROP" not in rules and " REJECT" not in rules:
            return
        rule = [
            "-i",
            self.bridge,
            "-o",
            self.bridge,
            "-m",
            "comment",
            "--comment",
            f"{PREFIX}{self.run_id}",
            "-j",
            "ACCEPT",
        ]
        _command([self.iptables, "-w", "-I", "FORWARD", "1", *rule], timeout=self.timeout)
        self._forward_rule = rule

    def _install_chains(self, host: Host) -> None:
        script = "\n".join(
            [
                "*filter",
                f":{PART_CHAIN} - [0:0]",
                f":{LOSS_IN_CHAIN} - [0:0]",
                f":{LOSS_OUT_CHAIN} - [0:0]",
                f"-A INPUT ! -i lo -j {LOSS_IN_CHAIN}",
                f"-A INPUT ! -i lo -j {PART_CHAIN}",
                f"-A OUTPUT ! -o lo -j {LOSS_OUT_CHAIN}",
                f"-A OUTPUT ! -o lo -j {PART_CHAIN}",
                "COMMIT",
                "",
            ]
        )
        self._restore(host, script)

    def _restore(self, host: Host, script: str) -> None:
        _command(
            ["ip", "netns", "exec", host.netns, f"{self.iptables}-restore", "-w", "--noflush"],
            input=script.encode(),
            timeout=self.timeout,
        )

    def teardown(self, raise_errors: bool = True) -> None:
        """Kill every process in the hosts and remove every namespace, link and rule."""
        if not self._created or self._torn_down:
            return
        self._torn_down = True
        atexit.unregister(self._teardown_at_exit)
        for proc in self._popen:
            kill9(proc)
        failures = _remove_run(self.run_id, self._record(), self.timeout)
        if not failures:
            self._record_path.unlink(missing_ok=True)
        log.info("netns.hosts_removed", extra={"fields": {"run": self.run_id, "failures": failures}})
        if failures:
            err = TeardownIncomplete("teardown left resources behind", run=self.run_id, failures=failures)
            if raise_errors:
                raise err
            log.error("netns.teardown_incomplete", extra={"fields": {"run": self.run_id, "failures": failures}})

    def _teardown_at_exit(self) -> None:
        try:
            self.teardown(raise_errors=False)
        except Exception:
            log.exception("netns.teardown_at_exit_failed", extra={"fields": {"run": self.run_id}})

    # ------------------------------------------------------------ processes

    def host(self, ref: Host | int) -> Host:
        if isinstance(ref, Host):
            return ref
        try:
            return self.hosts[ref]
        except (IndexError, TypeError) as exc:
            raise InvalidInput(f"no host {ref!r} (have {len(self.hosts)})", host=ref) from exc

    def exec_argv(self, host: Host | int, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed to run inside the host's namespace (for any launcher)."""
        return ["ip", "netns", "exec", self.host(host).netns, *argv]

    def run_in(self, host: Host | int, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start `argv` inside the host, in its own session (so `kill9` takes its
        children too). The process is killed at teardown if still running."""
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_argv(host, argv), **popen_kwargs)
        self._popen.append(proc)
        return proc

    def run(
        self, host: Host | int, argv: Sequence[str], *, timeout: float = 10.0, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run `argv` to completion inside the host (text output captured).
        With `check`, a non-zero exit raises NetnsError carrying its stderr."""
        full = self.exec_argv(host, argv)
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise NetnsError(
                f"{argv[0]} in {self.host(host).name} timed out after {timeout}s", command=" ".join(full)
            ) from exc
        if check and proc.returncode != 0:
            raise NetnsError(
                f"{' '.join(argv[:6])} in {self.host(host).name} failed: {proc.stderr.strip()}",
                command=" ".join(full),
                returncode=proc.returncode,
            )
        return proc

    # ------------------------------------------------------------ faults

    def _apply_part(self, hosts: Sequence[Host]) -> None:
        for host in hosts:
            lines = ["*filter", f":{PART_CHAIN} - [0:0]", f"-F {PART_CHAIN}"]
            lines += [f"-A {PART_CHAIN} {rule} -j DROP" for rule in self._faults[host.index].part]
            self._restore(host, "\n".join([*lines, "COMMIT", ""]))

    def partition(self, groups: Sequence[Sequence[Host | int]]) -> None:
        """Symmetric partition: hosts in different groups exchange no packets.
        Hosts named in no group form one more group together. Replaces any
        previous partition or one-way rule."""
        named = [[self.host(h) for h in group] for group in groups]
        flat = [h.index for group in named for h in group]
        if len(flat) != len(set(flat)):
            raise InvalidInput("a host appears in two partition groups", groups=groups)
        rest = [h for h in self.hosts if h.index not in set(flat)]
        if rest:
            named.append(rest)
        group_of = {h.index: g for g, group in enumerate(named) for h in group}
        for host in self.hosts:
            others = [o for o in self.hosts if group_of[o.index] != group_of[host.index]]
            self._faults[host.index].part = [f"-s {o.ip}/32" for o in others] + [f"-d {o.ip}/32" for o in others]
        self._apply_part(self.hosts)
        log.info(
            "netns.partition", extra={"fields": {"run": self.run_id, "groups": [[h.index for h in g] for g in named]}}
        )

    def isolate(self, host: Host | int) -> None:
        """Cut one host off from every other host (clients in the root namespace still reach it)."""
        self.partition([[self.host(host)]])

    def one_way(self, src: Host | int, dst: Host | int) -> None:
        """Asymmetric fault: packets from src to dst are dropped (at dst's INPUT);
        dst to src still flows. Adds to the current rules."""
        src, dst = self.host(src), self.host(dst)
        if src.index == dst.index:
            raise InvalidInput("one_way needs two different hosts", host=src.index)
        rule = f"-s {src.ip}/32"
        if rule not in self._faults[dst.index].part:
            self._faults[dst.index].part.append(rule)
        self._apply_part([dst])
        log.info("netns.one_way", extra={"fields": {"run": self.run_id, "src": src.index, "dst": dst.index}})

    def loss(self, host: Host | int, p: float, direction: str = "in") -> None:
        """Drop each non-loopback packet the host receives ("in"), sends ("out")
        or both with probability p. Replaces the host's previous loss setting
        for those directions; p=0 keeps a rule that never matches."""
        host, p = self.host(host), _as_probability(p)
        if direction not in ("in", "out", "both"):
            raise InvalidInput(f"loss direction must be in, out or both, got {direction!r}", direction=direction)
        faults = self._faults[host.index]
        lines = ["*filter"]
        for chain, d in ((LOSS_IN_CHAIN, "in"), (LOSS_OUT_CHAIN, "out")):
            if direction not in (d, "both"):
                continue
            lines += [
                f":{chain} - [0:0]",
                f"-F {chain}",
                f"-A {chain} -m statistic --mode random --probability {p:.6f} -j DROP",
            ]
            setattr(faults, f"loss_{d}", p)
            setattr(faults, f"loss_rule_{d}", True)
        self._restore(host, "\n".join([*lines, "COMMIT", ""]))
        log.info(
            "netns.loss", extra={"fields": {"run": self.run_id, "host": host.index, "p": p, "direction": direction}}
        )

    def heal(self) -> None:
        """Remove every partition, one-way and loss rule from every host."""
        script = "\n".join(["*filter", *(f"-F {c}" for c in (PART_CHAIN, LOSS_IN_CHAIN, LOSS_OUT_CHAIN)), "COMMIT", ""])
        for host in self.hosts:
            self._restore(host, script)
            self._faults[host.index] = _HostFaults()
        log.info("netns.healed", extra={"fields": {"run": self.run_id}})

    def faults(self) -> dict[int, dict]:
        """The fault rules each host carries now (for reports)."""
        return {
            i: {"drop": list(f.part), "loss_in": f.loss_in, "loss_out": f.loss_out}
            for i, f in self._faults.items()
            if f.part or f.loss_in or f.loss_out
        }

    def rule_counters(self, host: Host | int) -> list[RuleCounter]:
        """Packet/byte counters of the harness's fault rules in the host."""
        host = self.host(host)
        out = self.run(host, [f"{self.iptables}-save", "-c", "-t", "filter"], timeout=self.timeout).stdout
        counters = []
        pattern = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")
        for line in out.splitlines():
            m = pattern.match(line)
            if m and m.group(3) in (PART_CHAIN, LOSS_IN_CHAIN, LOSS_OUT_CHAIN):
                counters.append(RuleCounter(m.group(3), m.group(4), int(m.group(1)), int(m.group(2))))
        return counters


def kill9(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGKILL the process and its session (it was started with start_new_session)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    return proc.wait(timeout=timeout)


# ------------------------------------------------------------ scripts/netns-hosts


def _print_hosts(net: NetnsHosts) -> None:
    sys.stdout.write(
        f"run {net.run_id}: bridge {net.bridge} {net.gateway_ip}/{net.subnet.prefixlen}, iptables {net.iptables}\n"
    )
    for h in net.hosts:
        sys.stdout.write(f"  {h.name}  {h.ip:<15}  ip netns exec {h.netns} <command>\n")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="netns-hosts", description="Test hosts in network namespaces.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create N hosts that stay until `down`")
    up.add_argument("count", type=int)
    down = sub.add_parser("down", help="remove hosts made by `up` (all, or one run)")
    down.add_argument("run", nargs="?")
    sub.add_parser("ls", help="list runs")
    sub.add_parser("sweep", help="remove leftovers of runs whose owner died")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.cmd == "up":
        net = NetnsHosts(args.count, manual=True)
        net.create()
        _print_hosts(net)
        return 0
    if args.cmd == "down":
        removed = []
        with _registry_lock(RECORD_DIR):
            for run_id, record in _read_records(RECORD_DIR).items():
                if not record.get("manual") or (args.run and run_id != args.run):
                    continue
                failures = _remove_run(run_id, record)
                if failures:
                    sys.stderr.write(f"run {run_id}: could not remove: {failures}\n")
                    continue
                (RECORD_DIR / f"{run_id}.json").unlink(missing_ok=True)
                removed.append(run_id)
        sys.stdout.write(f"removed {len(removed)} run(s) {' '.join(removed)}\n")
        return 0
    if args.cmd == "ls":
        for run_id, record in sorted(_read_records(RECORD_DIR).items()):
            owner = "manual" if record.get("manual") else f"pid {record.get('pid')}"
            alive = "live" if _record_alive(record) else "stale"
            sys.stdout.write(
                f"{run_id}  {record.get('subnet')}  {len(record.get('hosts', []))} hosts  {owner} ({alive})\n"
            )
        return 0
    stale = sweep_stale()
    sys.stdout.write(f"swept {len(stale)} run(s) {' '.join(stale)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
