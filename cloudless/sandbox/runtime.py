"""The container runtime contract: what the agent asks of a node's sandbox.

`ContainerSpec` is the runtime's whole input — the agent maps an image config
plus a workload into one. `ContainerRuntime` is the interface; `RuncRuntime`
(runc.py) drives real runc and `MemoryRuntime` (memory.py) is its twin for
scheduler, agent and supervisor tests.

Lifecycle: `create` prepares everything that outlives one process run (bundle,
network namespace, address, published ports, log directory); `start` runs the
process; an exited container can be started again under the same id (its
address and logs stay); `delete` removes every trace.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Literal, Protocol

import msgspec

from cloudless.errors import CloudlessError, Conflict, InvalidInput, NotFound

# ---------------------------------------------------------------- errors


class SandboxError(CloudlessError):
    """A sandbox operation failed on this node."""


class InvalidContainerSpec(InvalidInput):
    """A ContainerSpec failed validation; `context` names the field."""


class ContainerNotFound(NotFound):
    pass


class ContainerExists(Conflict):
    pass


class ContainerStateError(Conflict):
    """The operation does not fit the container's current state (e.g. start while running)."""


class RuncFailed(SandboxError):
    """runc exited non-zero or timed out; `context` has the command and its stderr."""


class NetworkSetupFailed(SandboxError):
    """Bridge, veth, address or iptables setup failed."""


class PortInUse(Conflict):
    """Another container on this node already publishes the host port."""


class ExecTimeout(SandboxError):
    """An exec inside a container ran past its deadline and was killed."""


# ---------------------------------------------------------------- spec

NetworkMode = Literal["bridge", "host", "none"]
RestartMode = Literal["always", "on-failure", "never"]
HealthKind = Literal["exec", "tcp", "http"]
Status = Literal["created", "running", "exited", "unknown"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")
_USER = re.compile(r"^(?:[0-9]+|[A-Za-z_][A-Za-z0-9_.-]*)(?::(?:[0-9]+|[A-Za-z_][A-Za-z0-9_.-]*))?$")


class PortMapping(msgspec.Struct, frozen=True):
    host_port: int
    container_port: int
    proto: Literal["tcp", "udp"] = "tcp"


class BindMount(msgspec.Struct, frozen=True):
    """A host path (secret, volume) bound into the container."""

    source: str
    destination: str
    readonly: bool = True


class TmpfsMount(msgspec.Struct, frozen=True):
    destination: str
    size_bytes: int = 64 * 1024 * 1024
    mode: int = 0o1777


class RestartPolicy(msgspec.Struct, frozen=True):
    mode: RestartMode = "never"
    max_retries: int = 0  # on-failure only; 0 means unlimited
    backoff_initial: float = 0.5  # seconds
    backoff_max: float = 30.0
    # A run at least this long resets the backoff (not the retry count).
    backoff_reset_after: float = 10.0


class HealthCheck(msgspec.Struct, frozen=True):
    kind: HealthKind
    command: list[str] = []  # exec
    port: int = 0  # tcp, http (container port)
    path: str = "/"  # http
    interval: float = 10.0
    timeout: float = 5.0
    retries: int = 3  # consecutive failures that make it unhealthy
    start_period: float = 0.0  # failures inside it do not count


class ContainerSpec(msgspec.Struct, frozen=True):
    id: str
    rootfs: str
    args: list[str]
    env: dict[str, str] = {}
    cwd: str = "/"
    user: str = "0:0"  # "uid[:gid]" or names resolved from the rootfs's /etc/passwd, /etc/group
    hostname: str = ""
    cpu: float | None = None  # cores, enforced as CFS quota / period
    memory_bytes: int | None = None
    pids_limit: int | None = None
    readonly_rootfs: bool = False
    tmpfs: list[TmpfsMount] = []
    mounts: list[BindMount] = []
    network: NetworkMode = "bridge"
    ports: list[PortMapping] = []
    restart: RestartPolicy = RestartPolicy()
    health: HealthCheck | None = None
    labels: dict[str, str] = {}
    stop_signal: int = 15  # sent first by stop(); the image's STOPSIGNAL, SIGTERM by default


def validate_spec(spec: ContainerSpec) -> ContainerSpec:
    """Check what msgspec's types cannot; raise InvalidContainerSpec naming the field."""

    def bad(field: str, why: str) -> InvalidContainerSpec:
        return InvalidContainerSpec(f"container spec {field}: {why}", field=field, id=spec.id)

    if not _ID.match(spec.id):
        raise bad("id", f"{spec.id!r} must match {_ID.pattern}")
    if not spec.rootfs.startswith("/"):
        raise bad("rootfs", "must be an absolute path")
    if not spec.args or not all(isinstance(a, str) and "\0" not in a for a in spec.args):
        raise bad("args", "must be a non-empty list of strings without NUL")
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise bad("env", f"invalid variable {key!r}")
    if spec.hostname and not _HOSTNAME.match(spec.hostname):
        raise bad("hostname", f"{spec.hostname!r} is not a valid host name")
    if not spec.cwd.startswith("/"):
        raise bad("cwd", "must be absolute")
    if not _USER.match(spec.user):
        raise bad("user", f"{spec.user!r} is not uid[:gid] or name[:group]")
    if spec.cpu is not None and not (0.01 <= spec.cpu <= 1024):
        raise bad("cpu", "must be between 0.01 and 1024 cores")
    if spec.memory_bytes is not None and spec.memory_bytes < 4 * 1024 * 1024:
        raise bad("memory_bytes", "must be at least 4 MiB")
    if spec.pids_limit is not None and spec.pids_limit < 1:
        raise bad("pids_limit", "must be positive")
    seen_dest: set[str] = set()
    for m in [*spec.tmpfs, *spec.mounts]:
        if not m.destination.startswith("/") or ".." in m.destination.split("/"):
            raise bad("mounts", f"destination {m.destination!r} must be absolute without '..'")
        if m.destination in seen_dest:
            raise bad("mounts", f"destination {m.destination!r} mounted twice")
        seen_dest.add(m.destination)
    for b in spec.mounts:
        if not b.source.startswith("/"):
            raise bad("mounts", f"source {b.source!r} must be absolute")
    seen_ports: set[tuple[int, str]] = set()
    for p in spec.ports:
        if not (1 <= p.host_port <= 65535 and 1 <= p.container_port <= 65535):
            raise bad("ports", f"{p.host_port}:{p.container_port} out of range")
        if (p.host_port, p.proto) in seen_ports:
            raise bad("ports", f"host port {p.host_port}/{p.proto} published twice")
        seen_ports.add((p.host_port, p.proto))
    if spec.ports and spec.network != "bridge":
        raise bad("ports", "ports are published only in bridge mode (host mode binds directly)")
    if not (1 <= spec.stop_signal <= 64):
        raise bad("stop_signal", "must be a signal number 1..64")
    r = spec.restart
    if r.max_retries < 0 or r.backoff_initial <= 0 or r.backoff_max < r.backoff_initial:
        raise bad("restart", "max_retries >= 0 and 0 < backoff_initial <= backoff_max")
    h = spec.health
    if h is not None:
        if h.kind == "exec" and not h.command:
            raise bad("health", "exec check needs a command")
        if h.kind in ("tcp", "http") and not (1 <= h.port <= 65535):
            raise bad("health", "tcp/http check needs a port")
        if h.kind in ("tcp", "http") and spec.network == "none":
            raise bad("health", "tcp/http checks need a network; use an exec check with network none")
        if h.interval <= 0 or h.timeout <= 0 or h.retries < 1 or h.start_period < 0:
            raise bad("health", "interval, timeout > 0, retries >= 1, start_period >= 0")
    return spec


# ---------------------------------------------------------------- observations


class ContainerState(msgspec.Struct, frozen=True):
    id: str
    status: Status
    pid: int | None = None
    exit_code: int | None = None  # 128+N when killed by signal N
    oom_killed: bool = False
    started_at: float | None = None  # wall-clock seconds
    finished_at: float | None = None
    ip: str | None = None
    labels: dict[str, str] = {}


class ContainerStats(msgspec.Struct, frozen=True):
    cpu_usage_ns: int
    memory_bytes: int
    memory_limit_bytes: int | None
    pids: int


class ExecResult(msgspec.Struct, frozen=True):
    exit_code: int
    stdout: bytes
    stderr: bytes


class LogRecord(msgspec.Struct, frozen=True):
    offset: int  # position of the record in the container's whole log stream
    ts: float  # wall-clock seconds when the line was read from the container
    stream: Literal["stdout", "stderr"]
    text: str


class ExecSession(Protocol):
    """A process started in a running container, its IO streamed with backpressure:
    output is read from the process only as fast as `read_output` is called."""

    async def read_output(self) -> tuple[Literal["stdout", "stderr"], bytes] | None:
        """The next piece of output (at most 64 KiB); None once every output stream is closed."""

    async def write_stdin(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None:
        """EOF on the process's stdin (with a tty: the terminal's EOF character)."""

    def resize(self, rows: int, cols: int) -> None:
        """Set the tty's window size (the process gets SIGWINCH); no-op without a tty."""

    async def wait(self) -> int:
        """The process's exit code."""


class ContainerRuntime(Protocol):
    async def create(self, spec: ContainerSpec) -> ContainerState: ...

    async def start(self, container_id: str) -> ContainerState:
        """Run the process; an exited container runs again with the same id, address and logs."""

    async def wait(self, container_id: str) -> ContainerState:
        """Block until the current run exits; return its final state."""

    async def state(self, container_id: str) -> ContainerState: ...

    async def list(self) -> list[ContainerState]: ...

    async def inspect(self, container_id: str) -> ContainerSpec: ...

    async def stop(self, container_id: str, grace: float = 10.0) -> ContainerState:
        """The spec's stop_signal (SIGTERM), then SIGKILL after `grace` seconds; returns the exited state."""

    async def kill(self, container_id: str, signal: int) -> None: ...

    async def delete(self, container_id: str) -> None:
        """Kill if running and remove everything: process, cgroup, bundle, network, logs."""

    async def exec(self, container_id: str, args: list[str], timeout: float = 30.0) -> ExecResult: ...

    def exec_session(
        self,
        container_id: str,
        args: list[str],
        *,
        tty: bool = False,
        stdin: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> AbstractAsyncContextManager[ExecSession]:
        """Start `args` in the container; leaving the block kills the process if it still runs."""

    async def read_logs_from_end(self, container_id: str, tail: int) -> tuple[list[LogRecord], int]:
        """The last `tail` records and the offset just past the newest one (where following starts)."""

    async def stats(self, container_id: str) -> ContainerStats: ...

    async def read_logs(self, container_id: str, since_offset: int = 0, tail: int | None = None) -> list[LogRecord]: ...

    def follow_logs(self, container_id: str, since_offset: int = 0) -> AsyncIterator[LogRecord]: ...

    async def aclose(self) -> None:
        """Release what the runtime object holds (not the containers: they keep running)."""

    async def sweep(self) -> list[str]:
        """Remove leftovers of containers this runtime no longer knows (crash mid-create,
        runc state without a container, network rules); return their ids."""
