"""MemoryRuntime: the ContainerRuntime contract in memory, scripted, for tests.

Time is trio's clock, so tests run it under `trio.testing.MockClock` (autojump)
and minutes of restarts and health checks pass in milliseconds. Each start
consumes the next `ScriptedRun` queued for the container (default: run until
killed; a kill exits with 128+signal like a real process). Health
probes and exec answers are scripted too. Exits are computed lazily from
deadlines, so the twin needs no background tasks.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from cloudless.sandbox.runtime import (
    ContainerExists,
    ContainerNotFound,
    ContainerSpec,
    ContainerState,
    ContainerStateError,
    ContainerStats,
    ExecResult,
    HealthCheck,
    LogRecord,
    validate_spec,
)


@dataclass(frozen=True)
class ScriptedRun:
    """What the next start of a container does."""

    after: float | None = None  # seconds until it exits on its own; None: runs until killed
    exit_code: int = 0
    oom_killed: bool = False
    logs: tuple[tuple[str, str], ...] = ()  # (stream, text) written at start
    start_error: Exception | None = None  # start raises this instead


@dataclass
class _Container:
    spec: ContainerSpec
    ip: str | None
    status: str = "created"
    pid: int | None = None
    started_at: float | None = None
    deadline: float = math.inf
    exit_code: int | None = None
    oom_killed: bool = False
    finished_at: float | None = None
    runs: deque = field(default_factory=deque)
    pending: ScriptedRun | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    logs: list[LogRecord] = field(default_factory=list)
    log_offset: int = 0
    log_appended: trio.Event = field(default_factory=trio.Event)  # replaced after each set
    health: deque = field(default_factory=deque)
    health_default: bool = True
    start_count: int = 0


class MemoryRuntime:
    def __init__(self) -> None:
        self._containers: dict[str, _Container] = {}
        self._scripts: dict[str, deque] = {}  # runs queued before the container exists
        self._next_pid = 1000
        self._next_ip = 2
        self.exec_handler: Callable[[str, list[str]], ExecResult] = lambda cid, args: ExecResult(0, b"", b"")
        self.calls: list[tuple[str, str]] = []  # (operation, container id), for assertions
        self.exec_sessions: list[MemoryExecSession] = []

    # ------------------------------------------------------------ scripting

    def script(self, container_id: str, *runs: ScriptedRun) -> None:
        """Queue what the next starts of `container_id` do (may precede create)."""
        self._scripts.setdefault(container_id, deque()).extend(runs)
        if container_id in self._containers:
            self._containers[container_id].runs.extend(self._scripts.pop(container_id))

    def script_health(self, container_id: str, *results: bool, then: bool | None = None) -> None:
        """Queue probe answers; `then` is the answer once they run out (default: healthy)."""
        c = self._get(container_id)
        c.health.extend(results)
        if then is not None:
            c.health_default = then

    def emit_log(self, container_id: str, stream: str, text: str) -> None:
        c = self._get(container_id)
        c.logs.append(LogRecord(offset=c.log_offset, ts=trio.current_time(), stream=stream, text=text))
        c.log_offset += len(text) + 1
        c.log_appended.set()
        c.log_appended = trio.Event()

    def start_count(self, container_id: str) -> int:
        return self._get(container_id).start_count

    def prober(self) -> MemoryProber:
        return MemoryProber(self)

    # ------------------------------------------------------------ internals

    def _get(self, container_id: str) -> _Container:
        try:
            return self._containers[container_id]
        except KeyError:
            raise ContainerNotFound(f"no container {container_id!r}", id=container_id) from None

    def _settle(self, c: _Container) -> None:
        if c.status == "running" and trio.current_time() >= c.deadline:
            run = c.pending or ScriptedRun()
            self._finish(c, run.exit_code, run.oom_killed, at=c.deadline)

    def _finish(self, c: _Container, code: int, oom: bool, at: float | None = None) -> None:
        c.status = "exited"
        c.exit_code = code
        c.oom_killed = oom
        c.finished_at = trio.current_time() if at is None else at
        c.deadline = math.inf
        c.exited.set()

    def _state(self, cid: str, c: _Container) -> ContainerState:
        self._settle(c)
        return ContainerState(
            id=cid,
            status=c.status,  # type: ignore[arg-type]
            pid=c.pid,
            exit_code=c.exit_code,
            oom_killed=c.oom_killed,
            started_at=c.started_at,
            finished_at=c.finished_at,
            ip=c.ip,
            labels=dict(c.spec.labels),
        )

    # ------------------------------------------------------------ the contract

    async def create(self, spec: ContainerSpec) -> ContainerState:
        validate_spec(spec)
        self.calls.append(("create", spec.id))
        if spec.id in self._containers:
            raise ContainerExists(f"container {spec.id!r} exists", id=spec.id)
        ip = None
        if spec.network == "bridge":
            ip = f"10.88.0.{self._next_ip}"
            self._next_ip += 1
        c = _Container(spec=spec, ip=ip)
        c.runs.extend(self._scripts.pop(spec.id, ()))
        self._containers[spec.id] = c
        await trio.lowlevel.checkpoint()
        return self._state(spec.id, c)

    async def start(self, container_id: str) -> ContainerState:
        c = self._get(container_id)
        self.calls.append(("start", container_id))
        await trio.lowlevel.checkpoint()
        self._settle(c)
        if c.status == "running":
            raise ContainerStateError(f"container {container_id!r} is running", id=container_id)
        run = c.runs.popleft() if c.runs else ScriptedRun()
        if run.start_error is not None:
            raise run.start_error
        c.start_count += 1
        c.pending = run
        c.status = "running"
        c.pid = self._next_pid
        self._next_pid += 1
        c.started_at = trio.current_time()
        c.deadline = math.inf if run.after is None else c.started_at + run.after
        c.exit_code, c.oom_killed, c.finished_at = None, False, None
        c.exited = trio.Event()
        for stream, text in run.logs:
            self.emit_log(container_id, stream, text)
        return self._state(container_id, c)

    async def wait(self, container_id: str) -> ContainerState:
        c = self._get(container_id)
        while True:
            self._settle(c)
            if c.status == "exited":
                return self._state(container_id, c)
            if c.status != "running":
                raise ContainerStateError(f"container {container_id!r} was never started", id=container_id)
            with trio.move_on_at(c.deadline):
                await c.exited.wait()

    async def state(self, container_id: str) -> ContainerState:
        await trio.lowlevel.checkpoint()
        return self._state(container_id, self._get(container_id))

    async def list(self) -> list[ContainerState]:
        await trio.lowlevel.checkpoint()
        return [self._state(cid, c) for cid, c in sorted(self._containers.items())]

    async def inspect(self, container_id: str) -> ContainerSpec:
        await trio.lowlevel.checkpoint()
        return self._get(container_id).spec

    async def kill(self, container_id: str, signal: int) -> None:
        c = self._get(container_id)
        self.calls.append(("kill", container_id))
        await trio.lowlevel.checkpoint()
        self._settle(c)
        if c.status != "running":
            raise ContainerStateError(f"container {container_id!r} is not running", id=container_id)
        self._finish(c, 128 + int(signal), False)

    async def stop(self, container_id: str, grace: float = 10.0) -> ContainerState:
        c = self._get(container_id)
        self._settle(c)
        if c.status == "running":
            await self.kill(container_id, c.spec.stop_signal)
        return self._state(container_id, c)

    async def delete(self, container_id: str) -> None:
        c = self._get(container_id)
        self.calls.append(("delete", container_id))
        await trio.lowlevel.checkpoint()
        if c.status == "running":
            self._finish(c, 137, False)
        del self._containers[container_id]

    async def exec(self, container_id: str, args: list[str], timeout: float = 30.0) -> ExecResult:
        c = self._get(container_id)
        await trio.lowlevel.checkpoint()
        self._settle(c)
        if c.status != "running":
            raise ContainerStateError(f"container {container_id!r} is not running", id=container_id)
        return self.exec_handler(container_id, list(args))

    @asynccontextmanager
    async def exec_session(
        self,
        container_id: str,
        args: list[str],
        *,
        tty: bool = False,
        stdin: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> AsyncIterator[MemoryExecSession]:
        result = await self.exec(container_id, args)
        session = MemoryExecSession(result, tty=tty, rows=rows, cols=cols)
        self.exec_sessions.append(session)
        yield session

    async def stats(self, container_id: str) -> ContainerStats:
        c = self._get(container_id)
        await trio.lowlevel.checkpoint()
        return ContainerStats(cpu_usage_ns=0, memory_bytes=0, memory_limit_bytes=c.spec.memory_bytes, pids=1)

    async def read_logs(self, container_id: str, since_offset: int = 0, tail: int | None = None) -> list[LogRecord]:
        c = self._get(container_id)
        await trio.lowlevel.checkpoint()
        out = [r for r in c.logs if r.offset >= since_offset]
        if tail is not None:
            out = out[-tail:] if tail > 0 else []
        return out

    async def read_logs_from_end(self, container_id: str, tail: int) -> tuple[list[LogRecord], int]:
        c = self._get(container_id)
        await trio.lowlevel.checkpoint()
        return (c.logs[-tail:] if tail > 0 else []), c.log_offset

    async def follow_logs(self, container_id: str, since_offset: int = 0) -> AsyncIterator[LogRecord]:
        offset = since_offset
        while True:
            appended = self._get(container_id).log_appended  # taken before reading: no line slips between
            records = await self.read_logs(container_id, offset)
            for r in records:
                yield r
            if records:
                offset = records[-1].offset + 1
            else:
                await appended.wait()

    async def sweep(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return []

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class MemoryExecSession:
    """An exec answered by `MemoryRuntime.exec_handler`: its stdout then stderr, then its exit code.
    What is written to stdin and the window sizes set are kept for assertions."""

    def __init__(self, result: ExecResult, *, tty: bool, rows: int, cols: int) -> None:
        self._result = result
        pieces = [("stdout", result.stdout), ("stdout" if tty else "stderr", result.stderr)]
        self._outputs: deque = deque((name, data) for name, data in pieces if data)
        self.stdin = bytearray()
        self.stdin_closed = False
        self.sizes = [(rows, cols)]

    async def read_output(self):  # type: ignore[no-untyped-def]
        await trio.lowlevel.checkpoint()
        return self._outputs.popleft() if self._outputs else None

    async def write_stdin(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.stdin += data

    async def close_stdin(self) -> None:
        await trio.lowlevel.checkpoint()
        self.stdin_closed = True

    def resize(self, rows: int, cols: int) -> None:
        self.sizes.append((rows, cols))

    async def wait(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._result.exit_code


class MemoryProber:
    """Answers health probes from MemoryRuntime.script_health."""

    def __init__(self, runtime: MemoryRuntime) -> None:
        self.runtime = runtime
        self.probes: list[str] = []

    async def probe(self, container_id: str, check: HealthCheck) -> bool:
        await trio.lowlevel.checkpoint()
        self.probes.append(container_id)
        c = self.runtime._get(container_id)
        return c.health.popleft() if c.health else c.health_default
