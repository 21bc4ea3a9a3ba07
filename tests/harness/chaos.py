"""The chaos harness: one process per network-namespace host, faults on a
schedule, and a client workload whose history goes to the linearizability
checker.

    spec = ProcessSpec(
        argv=[cloudless_bin, "node", "--data-dir", "{data_dir}", "--listen", "{address}",
              "--advertise", "{address}", "{join_flags}"],
        port=7400, ready=node_ready)
    async with ChaosCluster(3, tmp_path, spec, seed=seed) as cluster:
        await cluster.start(0, join_flags="")           # bootstraps
        token = ...                                      # e.g. `cloudless token create --json`
        for i in (1, 2):                                 # "\0" splits one template into several args
            await cluster.start(i, join_flags=f"--join\0{cluster.process(0).address}\0--token\0{token}")
        result = await cluster.run_workload(
            VarsWorkload(operate=vars_op, duration_s=20),
            random_schedule(seed, 3, 20.0, leader=find_leader))
        check = result.check()
        assert check.linearizable, result.summary() + check.explanation + cluster.report()

Processes run in the root file system but in their host's network namespace
(`ip netns exec`), each in its own session so `kill9` takes its children too;
stdout and stderr go to `<run_dir>/logs/host<i>.log`, appended across
restarts. Clients run in the test process (root namespace) and reach every
host through the bridge; partitions cut hosts from each other, not from
clients, as in Jepsen where the control node stays connected. Loss does hit
client traffic to the lossy host.

Workload semantics (`VarsWorkload`, for `VersionedRegisterModel`): ops are
`get() -> (value, index) | None`, `put(value) -> index`,
`cas((expected_index, value)) -> (ok, index)`, `rm() -> bool`; every written
value is unique in the run. `operate` returning is a known outcome; raising
`NotApplied` means the op certainly did not take effect (left out of the
history); raising one of `VarsWorkload.indeterminate` or running past
`op_timeout_s` records an op with `ret=None` (outcome unknown), and that client
continues under a fresh client id, since its old request may still land. Any
other exception is a bug in the harness or `operate` and fails the run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio

from cloudless.errors import CloudlessError, InvalidInput
from cloudless.testing.linearizability import CheckResult, Model, Operation, VersionedRegisterModel, check_history
from tests.harness.netns import Host, NetnsHosts

log = logging.getLogger(__name__)


class ChaosError(CloudlessError):
    """The harness could not do what it was asked (process, fault, workload)."""


class ProcessExited(ChaosError):
    """A host process exited when it was expected to run."""


class NotApplied(CloudlessError):
    """Raised by a workload `operate` function: the operation certainly did not
    take effect (e.g. refused before it was sent), so it is left out of the history."""


# ------------------------------------------------------------------ processes


@dataclass(frozen=True)
class ProcessSpec:
    """How to run the per-host process.

    `argv` and `env` values are `str.format` templates over: index, name,
    host_ip, port, address (ip:port), data_dir, run_dir, join (host 0's
    address), peers (comma-separated addresses of all hosts), plus the
    cluster's and the start call's extra values. A template that formats to an
    empty string is dropped from argv; one containing NUL-separated parts
    ("a\\0b") is split, so an extra value can expand to several flags or none.
    """

    argv: Sequence[str]
    port: int = 7400
    env: Mapping[str, str] = field(default_factory=dict)
    stop_grace_s: float = 5.0
    # Awaited after each start until it returns; raising fails the start.
    ready: Callable[[HostProcess], Awaitable[None]] | None = None
    ready_timeout_s: float = 30.0


class HostProcess:
    """The process of one host: start, stop, kill -9, restart; logs to a file."""

    def __init__(self, cluster: ChaosCluster, host: Host) -> None:
        self.cluster = cluster
        self.host = host
        self.spec = cluster.spec
        self.extra: dict[str, Any] = {}
        self.proc: trio.Process | None = None
        self.starts = 0
        self.paused = False
        self.data_dir = cluster.run_dir / host.name
        self.log_path = cluster.run_dir / "logs" / f"{host.name}.log"

    @property
    def address(self) -> str:
        return f"{self.host.ip}:{self.spec.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    def values(self) -> dict[str, Any]:
        hosts = self.cluster.hosts
        return {
            "index": self.host.index,
            "name": self.host.name,
            "host_ip": self.host.ip,
            "port": self.spec.port,
            "address": self.address,
            "data_dir": str(self.data_dir),
            "run_dir": str(self.cluster.run_dir),
            "join": f"{hosts[0].ip}:{self.spec.port}",
            "peers": ",".join(f"{h.ip}:{self.spec.port}" for h in hosts),
            **self.cluster.extra,
            **self.extra,
        }

    def _render(self, template: str, values: Mapping[str, Any]) -> str:
        try:
            return template.format_map(values)
        except (KeyError, IndexError, ValueError) as exc:
            raise InvalidInput(f"process template {template!r} cannot be filled: {exc}", template=template) from exc

    def argv(self) -> list[str]:
        values = self.values()
        out: list[str] = []
        for template in self.spec.argv:
            out += [part for part in self._render(template, values).split("\0") if part]
        return out

    def _open_log(self, argv: list[str]) -> BinaryIO:
        """This host's log, appended to across restarts, with a banner per start
        (the process writes into it directly; opening a local file does not wait)."""
        logfile = open(self.log_path, "ab")  # the caller's `with` closes it
        logfile.write(f"=== start {self.starts}: {' '.join(argv)}\n".encode())
        logfile.flush()
        return logfile

    async def start(self, **extra: Any) -> None:
        """Start the process (extra template values stick for later restarts)."""
        if self.running:
            raise ChaosError(f"{self.host.name} is already running", host=self.host.index)
        self.extra.update(extra)
        argv = self.argv()
        values = self.values()
        env = {**os.environ, **{k: self._render(v, values) for k, v in self.spec.env.items()}}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self._open_log(argv) as logfile:
            self.proc = await trio.lowlevel.open_process(
                self.cluster.net.exec_argv(self.host, argv),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        log.info(
            "chaos.process_started",
            extra={"fields": {"host": self.host.index, "pid": self.proc.pid, "start": self.starts}},
        )
        if self.spec.ready is not None:
            await self._wait_ready()

    async def _wait_ready(self) -> None:
        proc = self.proc
        with trio.move_on_after(self.spec.ready_timeout_s) as scope:
            async with trio.open_nursery() as nursery:

                async def watch_exit() -> None:
                    await proc.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_exit)
                await self.spec.ready(self)
                nursery.cancel_scope.cancel()
        if proc.returncode is not None:
            raise ProcessExited(
                f"{self.host.name} exited with {proc.returncode} before it was ready\n{self.tail()}",
                host=self.host.index,
                returncode=proc.returncode,
            )
        if scope.cancelled_caught:
            raise ChaosError(
                f"{self.host.name} not ready after {self.spec.ready_timeout_s}s\n{self.tail()}", host=self.host.index
            )

    def _signal_session(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def pause(self) -> bool:
        """SIGSTOP the session: the process holds its sockets but does nothing,
        like a long GC pause or a frozen VM (Jepsen's "pause"). False if there
        was no running process to pause."""
        if not self.running:
            return False
        self._signal_session(signal.SIGSTOP)
        self.paused = True
        log.info("chaos.process_paused", extra={"fields": {"host": self.host.index, "pid": self.proc.pid}})
        return True

    def resume(self) -> None:
        if self.running:
            self._signal_session(signal.SIGCONT)
        self.paused = False

    async def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after the grace period; the exit status."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.paused:
                self.resume()  # a stopped process cannot act on SIGTERM
            with trio.move_on_after(self.spec.stop_grace_s if grace_s is None else grace_s):
                await self.proc.wait()
        return await self.kill9()

    async def kill9(self) -> int | None:
        """SIGKILL the process's whole session and reap it; the exit status."""
        if self.proc is None:
            return None
        self.paused = False
        if self.proc.returncode is None:
            self._signal_session(signal.SIGKILL)
            log.info("chaos.process_killed", extra={"fields": {"host": self.host.index, "pid": self.proc.pid}})
        with trio.fail_after(10):
            return await self.proc.wait()

    async def restart(self, **extra: Any) -> None:
        await self.kill9()
        await self.start(**extra)

    async def wait(self) -> int:
        if self.proc is None:
            raise ChaosError(f"{self.host.name} was never started", host=self.host.index)
        return await self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return f"--- {self.host.name}: no log"
        body = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.host.name} ({self.log_path}), last {lines} lines:\n{body}"

    def describe(self) -> str:
        if self.proc is None:
            return f"{self.host.name} {self.host.ip}: never started"
        if self.running:
            state = "paused" if self.paused else "running"
            return f"{self.host.name} {self.host.ip}: {state} pid {self.proc.pid} (start {self.starts})"
        return f"{self.host.name} {self.host.ip}: exited {self.proc.returncode} (start {self.starts})"


# ------------------------------------------------------------------ faults

# A host: its index, or an async function of the cluster that names one
# (e.g. the current Raft leader).
Target = int | Callable[["ChaosCluster"], Awaitable[int]]


async def _resolve(cluster: ChaosCluster, target: Target) -> int:
    return target if isinstance(target, int) else int(await target(cluster))


@dataclass(frozen=True)
class Partition:
    groups: Sequence[Sequence[int]]

    async def apply(self, cluster: ChaosCluster) -> str:
        await cluster.partition(self.groups)
        return f"partition {[list(g) for g in self.groups]}"


@dataclass(frozen=True)
class Isolate:
    target: Target

    async def apply(self, cluster: ChaosCluster) -> str:
        host = await _resolve(cluster, self.target)
        await cluster.isolate(host)
        return f"isolate host{host}"


@dataclass(frozen=True)
class OneWay:
    src: Target
    dst: Target

    async def apply(self, cluster: ChaosCluster) -> str:
        src, dst = await _resolve(cluster, self.src), await _resolve(cluster, self.dst)
        await cluster.one_way(src, dst)
        return f"one-way drop host{src} -> host{dst}"


@dataclass(frozen=True)
class Loss:
    target: Target
    p: float
    direction: str = "in"

    async def apply(self, cluster: ChaosCluster) -> str:
        host = await _resolve(cluster, self.target)
        await cluster.loss(host, self.p, self.direction)
        return f"loss host{host} p={self.p} {self.direction}"


@dataclass(frozen=True)
class Heal:
    async def apply(self, cluster: ChaosCluster) -> str:
        await cluster.heal()
        return "heal"


@dataclass(frozen=True)
class Kill9:
    target: Target

    async def apply(self, cluster: ChaosCluster) -> str:
        host = await _resolve(cluster, self.target)
        await cluster.kill9(host)
        return f"kill -9 host{host}"


@dataclass(frozen=True)
class Restart:
    """Start a host's process again; with no target, every host whose process is not running."""

    target: Target | None = None

    async def apply(self, cluster: ChaosCluster) -> str:
        if self.target is None:
            down = [p.host.index for p in cluster.processes if p.proc is not None and not p.running]
        else:
            down = [await _resolve(cluster, self.target)]
        for host in down:
            await cluster.restart(host)
        return f"restart {[f'host{h}' for h in down]}"


@dataclass(frozen=True)
class Stop:
    """Graceful stop: SIGTERM, SIGKILL after `grace_s`. Restart() brings it back."""

    target: Target
    grace_s: float = 5.0

    async def apply(self, cluster: ChaosCluster) -> str:
        host = await _resolve(cluster, self.target)
        await cluster.stop(host, self.grace_s)
        return f"stop host{host}"


@dataclass(frozen=True)
class Pause:
    target: Target

    async def apply(self, cluster: ChaosCluster) -> str:
        host = await _resolve(cluster, self.target)
        paused = cluster.process(host).pause()
        return f"pause host{host}" + ("" if paused else " (not running)")


@dataclass(frozen=True)
class Resume:
    """SIGCONT a paused host; with no target, every paused host."""

    target: Target | None = None

    async def apply(self, cluster: ChaosCluster) -> str:
        if self.target is None:
            hosts = [p.host.index for p in cluster.processes if p.paused]
        else:
            hosts = [await _resolve(cluster, self.target)]
        for host in hosts:
            cluster.process(host).resume()
        return f"resume {[f'host{h}' for h in hosts]}"


Fault = Partition | Isolate | OneWay | Loss | Heal | Kill9 | Restart | Stop | Pause | Resume
_REPAIR = {"kill9": "restart", "stop": "restart", "pause": "resume"}
Schedule = Sequence[tuple[float, Fault]]


def random_schedule(
    seed: int | random.Random,
    hosts: int,
    duration_s: float,
    *,
    kinds: Sequence[str] = ("partition", "isolate", "one_way", "loss", "kill9"),
    fault_s: tuple[float, float] = (1.0, 3.0),
    calm_s: tuple[float, float] = (0.5, 2.0),
    loss_p: tuple[float, float] = (0.1, 0.5),
    leader: Callable[[ChaosCluster], Awaitable[int]] | None = None,
) -> list[tuple[float, Fault]]:
    """Faults one at a time, each repaired before the next (Heal; Restart
    after kill9 or stop; Resume after pause); the last repair lands by
    `duration_s`. Kinds: partition, isolate, one_way, loss, kill9, stop,
    pause. With `leader`, half of the isolations, kills, stops and pauses
    target the current leader."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    if hosts < 2 and any(k in kinds for k in ("partition", "isolate", "one_way")):
        raise InvalidInput("network faults between hosts need at least 2 hosts", hosts=hosts)
    out: list[tuple[float, Fault]] = []
    t = rng.uniform(*calm_s)
    while True:
        length = rng.uniform(*fault_s)
        if t + length > duration_s:
            break
        kind = rng.choice(list(kinds))
        pick: Target = rng.randrange(hosts)
        if leader is not None and kind in ("isolate", "kill9", "stop", "pause") and rng.random() < 0.5:
            pick = leader
        if kind == "partition":
            order = list(range(hosts))
            rng.shuffle(order)
            cut = rng.randrange(1, hosts)
            fault: Fault = Partition((tuple(sorted(order[:cut])), tuple(sorted(order[cut:]))))
        elif kind == "isolate":
            fault = Isolate(pick)
        elif kind == "one_way":
            src, dst = rng.sample(range(hosts), 2)
            fault = OneWay(src, dst)
        elif kind == "loss":
            fault = Loss(rng.randrange(hosts), round(rng.uniform(*loss_p), 3), rng.choice(("in", "out", "both")))
        elif kind == "kill9":
            fault = Kill9(pick)
        elif kind == "stop":
            fault = Stop(pick)
        elif kind == "pause":
            fault = Pause(pick)
        else:
            raise InvalidInput(f"unknown fault kind {kind!r}", kind=kind)
        repair = {"restart": Restart(), "resume": Resume()}.get(_REPAIR.get(kind, ""), Heal())
        out.append((round(t, 3), fault))
        out.append((round(t + length, 3), repair))
        t += length + rng.uniform(*calm_s)
    return out


# ------------------------------------------------------------------ workload

Operate = Callable[[Host, str, str, Any], Awaitable[Any]]


def _indeterminate_default() -> tuple[type[BaseException], ...]:
    return (OSError, EOFError, CloudlessError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


@dataclass
class VarsWorkload:
    """Clients doing get/put/cas (and optionally rm) on a few keys.

    `operate(host, op, key, input)` performs one op against `host` and returns
    its output in the `VersionedRegisterModel` shapes (see module doc)."""

    operate: Operate
    clients: int = 4
    keys: Sequence[str] = ("k0", "k1", "k2")
    duration_s: float = 10.0
    max_ops: int = 5000
    op_timeout_s: float = 2.0
    mix: Mapping[str, float] = field(default_factory=lambda: {"get": 0.4, "put": 0.3, "cas": 0.3})
    think_s: float = 0.0  # mean pause between one client's ops (exponential)
    backoff_s: float = 0.05  # pause after an op that failed or timed out, so a dead host is not spun on
    hosts: Sequence[int] | None = None  # hosts clients pick from; default all
    indeterminate: tuple[type[BaseException], ...] = field(default_factory=_indeterminate_default)
    cas_blind_p: float = 0.1  # chance a cas expects index 0 (must not exist) instead of the last seen


@dataclass
class WorkloadResult:
    seed: int
    history: list[Operation]
    not_applied: int
    errors: Counter  # exception type (or "timeout") -> ops left indeterminate by it
    faults: list[tuple[float, str]]
    elapsed_s: float

    def counts(self) -> dict[str, int]:
        c: Counter = Counter()
        for op in self.history:
            c[f"{op.op}:{'unknown' if op.ret is None else 'ok'}"] += 1
        return dict(sorted(c.items()))

    def check(self, model: Model | None = None, timeout_s: float | None = 120.0) -> CheckResult:
        return check_history(self.history, model or VersionedRegisterModel(), timeout_s=timeout_s)

    def summary(self) -> str:
        faults = "\n".join(f"  t={t:7.3f}  {what}" for t, what in self.faults) or "  (none)"
        return (
            f"workload seed={self.seed}: {len(self.history)} ops in {self.elapsed_s:.1f}s {self.counts()}, "
            f"not applied {self.not_applied}, indeterminate by {dict(self.errors)}\nfaults:\n{faults}\n"
        )

    def save(self, path: Path) -> None:
        """The history and fault log as JSON lines, for replaying the check by hand."""
        with open(path, "w") as f:
            f.write(json.dumps({"seed": self.seed, "faults": self.faults}) + "\n")
            for op in self.history:
                f.write(json.dumps([op.client_id, op.key, op.op, op.input, op.output, op.call, op.ret]) + "\n")


def load_history(path: Path) -> tuple[dict, list[Operation]]:
    """Read back what `WorkloadResult.save` wrote."""
    with open(path) as f:
        head = json.loads(f.readline())
        ops = []
        for line in f:
            c, k, o, i, out, call, ret = json.loads(line)
            ops.append(Operation(c, k, o, i, out, call, ret))
    return head, ops


class _Budget:
    def __init__(self, n: int) -> None:
        self.left = n

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def run_workload(
    hosts: Sequence[Host],
    workload: VarsWorkload,
    *,
    seed: int,
    schedule: Schedule = (),
    cluster: ChaosCluster | None = None,
    heal_at_end: bool = True,
) -> WorkloadResult:
    """Run the clients for `workload.duration_s` (or `max_ops` ops) while the
    schedule's faults fire at their times; stops by itself. Faults need
    `cluster`. With `heal_at_end`, the network is healed, paused processes resumed and dead ones
    restarted before returning."""
    if schedule and cluster is None:
        raise InvalidInput("a fault schedule needs the cluster to act on")
    if workload.clients < 1 or not workload.keys:
        raise InvalidInput("a workload needs at least one client and one key")
    ops, weights = zip(*[(op, w) for op, w in workload.mix.items() if w > 0], strict=True)
    for op in ops:
        if op not in ("get", "put", "cas", "rm"):
            raise InvalidInput(f"unknown vars operation {op!r}", op=op)
    targets = [hosts[i] for i in workload.hosts] if workload.hosts is not None else list(hosts)
    history: list[Operation] = []
    errors: Counter = Counter()
    faults: list[tuple[float, str]] = []
    not_applied = 0
    budget = _Budget(workload.max_ops)
    next_client_id = workload.clients
    t0 = trio.current_time()
    end = t0 + workload.duration_s
    log.info(
        "chaos.workload_started",
        extra={
            "fields": {
                "seed": seed,
                "clients": workload.clients,
                "duration_s": workload.duration_s,
                "faults": len(schedule),
            }
        },
    )

    def fresh_client_id() -> int:
        nonlocal next_client_id
        next_client_id += 1
        return next_client_id - 1

    async def client(worker: int) -> None:
        nonlocal not_applied
        rng = random.Random(seed * 1_000_003 + worker)
        client_id = worker
        seen: dict[str, int] = {}
        seq = 0
        while trio.current_time() < end and budget.take():
            host = rng.choice(targets)
            key = rng.choice(list(workload.keys))
            op = rng.choices(ops, weights)[0]
            seq += 1
            value = f"w{worker}.{seq}"
            if op == "put":
                arg: Any = value
            elif op == "cas":
                arg = (0 if rng.random() < workload.cas_blind_p else seen.get(key, 0), value)
            else:
                arg = None
            call = trio.current_time()
            outcome: Any = None
            state = "unknown"
            with trio.move_on_after(workload.op_timeout_s) as scope:
                try:
                    outcome = await workload.operate(host, op, key, arg)
                    state = "known"
                except NotApplied:
                    state = "not_applied"
                except workload.indeterminate as exc:
                    errors[type(exc).__name__] += 1
            if scope.cancelled_caught:
                errors["timeout"] += 1
            ret = trio.current_time()
            if state == "known":
                history.append(Operation(client_id, key, op, arg, outcome, call - t0, ret - t0))
                _observe(seen, key, op, outcome)
            elif state == "not_applied":
                not_applied += 1
            else:
                history.append(Operation(client_id, key, op, arg, None, call - t0, None))
                client_id = fresh_client_id()
            if state != "known" and workload.backoff_s > 0:
                await trio.sleep(workload.backoff_s)
            if workload.think_s > 0:
                await trio.sleep(rng.expovariate(1.0 / workload.think_s))

    async def run_schedule() -> None:
        for at, fault in sorted(schedule, key=lambda item: item[0]):
            await trio.sleep_until(t0 + at)
            what = await fault.apply(cluster)
            faults.append((round(trio.current_time() - t0, 3), what))
            log.info("chaos.fault", extra={"fields": {"t": faults[-1][0], "fault": what, "seed": seed}})

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as clients:
            for worker in range(workload.clients):
                clients.start_soon(client, worker)
            nursery.start_soon(run_schedule)
        nursery.cancel_scope.cancel()  # the clients are done: no more faults
    if heal_at_end and cluster is not None:
        for fault in (Heal(), Resume(), Restart()):
            what = await fault.apply(cluster)
            faults.append((round(trio.current_time() - t0, 3), f"end: {what}"))
    history.sort(key=lambda o: (o.call, o.client_id))
    result = WorkloadResult(seed, history, not_applied, errors, faults, trio.current_time() - t0)
    log.info("chaos.workload_done", extra={"fields": {"seed": seed, "ops": len(history), **result.counts()}})
    return result


def _observe(seen: dict[str, int], key: str, op: str, output: Any) -> None:
    """Remember the key's latest modify index, for the next cas."""
    if op == "get":
        seen[key] = 0 if output is None else int(output[1])
    elif op == "put":
        seen[key] = int(output)
    elif op == "cas":
        seen[key] = int(output[1])
    elif op == "rm":
        seen[key] = 0


# ------------------------------------------------------------------ the cluster


class ChaosCluster:
    """K namespace hosts, one `ProcessSpec` process per host, faults, workloads.

    An async context manager: on exit every process is killed and every
    namespace removed, whatever happened; if the body raised, the exception
    gets a note with the seed, the faults in force and each process's log tail.
    """

    def __init__(
        self,
        hosts: int,
        run_dir: Path,
        spec: ProcessSpec | None = None,
        *,
        seed: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.size = hosts
        self.run_dir = Path(run_dir)
        self.spec = spec or ProcessSpec(argv=["true"])
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.rng = random.Random(self.seed)
        self.extra: dict[str, Any] = dict(extra or {})
        self.net = NetnsHosts(hosts)
        self.processes: list[HostProcess] = []
        self._net_lock = trio.Lock()

    @property
    def hosts(self) -> list[Host]:
        return self.net.hosts

    async def __aenter__(self) -> ChaosCluster:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(self.net.create)
        self.processes = [HostProcess(self, h) for h in self.hosts]
        log.info("chaos.cluster_up", extra={"fields": {"run": self.net.run_id, "seed": self.seed, "hosts": self.size}})
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc is not None and isinstance(exc, Exception):
            report = self.report()
            exc.add_note(report)
            log.error("chaos.failed", extra={"fields": {"seed": self.seed, "report": report}})
        with trio.CancelScope(shield=True):
            try:
                for proc in self.processes:
                    await proc.kill9()
            finally:
                await trio.to_thread.run_sync(self.net.teardown, exc_type is None)

    def process(self, host: Host | int) -> HostProcess:
        return self.processes[self.net.host(host).index]

    # processes
    async def start(self, host: Host | int, **extra: Any) -> HostProcess:
        proc = self.process(host)
        await proc.start(**extra)
        return proc

    async def start_all(self, **extra: Any) -> None:
        """Start every host's process that is not running, concurrently."""
        async with trio.open_nursery() as nursery:
            for proc in self.processes:
                if not proc.running:
                    nursery.start_soon(lambda p=proc: p.start(**extra))

    async def stop(self, host: Host | int, grace_s: float | None = None) -> int | None:
        return await self.process(host).stop(grace_s)

    async def kill9(self, host: Host | int) -> int | None:
        return await self.process(host).kill9()

    async def run(
        self, host: Host | int, argv: Sequence[str], *, timeout_s: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a command to completion inside a host (e.g. a CLI call that must
        come from that host's side of a partition); output captured as bytes."""
        with trio.fail_after(timeout_s):
            return await trio.run_process(
                self.net.exec_argv(host, argv), capture_stdout=True, capture_stderr=True, check=check
            )

    async def pause(self, host: Host | int) -> bool:
        return self.process(host).pause()

    async def resume(self, host: Host | int) -> None:
        self.process(host).resume()

    async def restart(self, host: Host | int, **extra: Any) -> HostProcess:
        proc = self.process(host)
        await proc.restart(**extra)
        return proc

    # network faults (iptables calls run in a thread so clients keep going)
    async def _net(self, fn: Callable, *args: Any) -> None:
        async with self._net_lock:
            await trio.to_thread.run_sync(fn, *args)

    async def partition(self, groups: Sequence[Sequence[Host | int]]) -> None:
        await self._net(self.net.partition, groups)

    async def isolate(self, host: Host | int) -> None:
        await self._net(self.net.isolate, host)

    async def one_way(self, src: Host | int, dst: Host | int) -> None:
        await self._net(self.net.one_way, src, dst)

    async def loss(self, host: Host | int, p: float, direction: str = "in") -> None:
        await self._net(self.net.loss, host, p, direction)

    async def heal(self) -> None:
        await self._net(self.net.heal)

    async def apply(self, fault: Fault) -> str:
        return await fault.apply(self)

    async def run_workload(
        self, workload: VarsWorkload, schedule: Schedule = (), *, seed: int | None = None, heal_at_end: bool = True
    ) -> WorkloadResult:
        seed = self.seed if seed is None else seed
        result = await run_workload(
            self.hosts, workload, seed=seed, schedule=schedule, cluster=self, heal_at_end=heal_at_end
        )
        result.save(self.run_dir / f"history-{seed}.jsonl")
        return result

    def report(self, tail_lines: int = 30) -> str:
        """Seed, faults in force, process states and log tails: for failure messages."""
        lines = [
            f"chaos run {self.net.run_id} seed={self.seed} (run dir {self.run_dir})",
            f"faults in force: {self.net.faults() or 'none'}",
            *(p.describe() for p in self.processes),
            *(p.tail(tail_lines) for p in self.processes if p.starts),
        ]
        return "\n".join(lines)


async def wait_tcp(ip: str, port: int, timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    """Until a TCP connection to ip:port succeeds (a `ProcessSpec.ready` building block)."""
    with trio.fail_after(timeout_s):
        while True:
            try:
                with trio.fail_after(min(1.0, timeout_s)):
                    stream = await trio.open_tcp_stream(ip, port)
            except (OSError, trio.TooSlowError):
                await trio.sleep(interval_s)
                continue
            await stream.aclose()
            return
