"""Keeps containers running: restart policies with backoff, health checks, adoption.

One watcher task per container: start it, race its exit against its health
loop, and decide — with the pure `restart_delay` — whether and when to start
it again. Everything the watcher observes goes out as an event on the
channel the caller supplies (the agent reports them to the cluster).

Time is trio's clock and randomness an injected `random.Random`, so the tests
drive it with the memory twin under MockClock. Events are sent with `await`:
give the channel a buffer, since a consumer that stops reading holds
supervision back rather than losing events.

Ownership and adoption: every container a supervisor creates carries the label
`cloudless.supervisor=<name>`. After a node restart, `run()` first lists the
runtime's containers: ours that the caller still wants (`keep`) are adopted —
a running one is watched as it is, never started twice; an exited one is
restarted per its policy — and ours that it no longer wants are deleted.
Containers labelled for another supervisor are left alone. The restart count
is not persisted: an adopted container starts counting from zero.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import trio

from cloudless.errors import CloudlessError
from cloudless.sandbox.health import HealthProber, HealthStatus, HealthTracker, RuntimeProber
from cloudless.sandbox.runtime import (
    ContainerExists,
    ContainerNotFound,
    ContainerRuntime,
    ContainerSpec,
    ContainerState,
    ContainerStateError,
    RestartPolicy,
    SandboxError,
)

log = logging.getLogger(__name__)

OWNER_LABEL = "cloudless.supervisor"


# ---------------------------------------------------------------- events


class Started(msgspec.Struct, frozen=True, tag=True):
    id: str
    pid: int | None
    restart_count: int


class Adopted(msgspec.Struct, frozen=True, tag=True):
    id: str
    status: str


class StartFailed(msgspec.Struct, frozen=True, tag=True):
    id: str
    error: str


class Exited(msgspec.Struct, frozen=True, tag=True):
    id: str
    exit_code: int | None
    oom_killed: bool


class OomKilled(msgspec.Struct, frozen=True, tag=True):
    id: str


class HealthChanged(msgspec.Struct, frozen=True, tag=True):
    id: str
    status: str
    failures: int


class Unhealthy(msgspec.Struct, frozen=True, tag=True):
    id: str
    failures: int


class Restarting(msgspec.Struct, frozen=True, tag=True):
    id: str
    attempt: int
    backoff: float


class GaveUp(msgspec.Struct, frozen=True, tag=True):
    """The policy says no more restarts; the container stays exited."""

    id: str
    exit_code: int | None
    restart_count: int


class Removed(msgspec.Struct, frozen=True, tag=True):
    id: str
    reason: str


class WatchFailed(msgspec.Struct, frozen=True, tag=True):
    """The runtime failed in a way the watcher cannot handle; the container is no longer supervised."""

    id: str
    error: str


SupervisorEvent = (
    Started
    | Adopted
    | StartFailed
    | Exited
    | OomKilled
    | HealthChanged
    | Unhealthy
    | Restarting
    | GaveUp
    | Removed
    | WatchFailed
)


# ---------------------------------------------------------------- the policy


def restart_delay(
    policy: RestartPolicy, restarts_so_far: int, exit_code: int | None, backoff_step: int, rng: random.Random
) -> float | None:
    """Seconds to wait before the next start, or None for no restart.

    `exit_code` None means the run failed without a code (start error, lost
    shim), which counts as a failure. Backoff is exponential in `backoff_step`
    with "equal jitter": half the step fixed, half uniform random, so restarts
    of many containers spread out but never come sooner than half the step.
    """
    if policy.mode == "never":
        return None
    if policy.mode == "on-failure":
        if exit_code == 0:
            return None
        if policy.max_retries and restarts_so_far >= policy.max_retries:
            return None
    step = min(policy.backoff_max, policy.backoff_initial * (2 ** min(backoff_step, 62)))
    return step / 2 + rng.uniform(0, step / 2)


# ---------------------------------------------------------------- supervisor


@dataclass
class Supervised:
    """What the supervisor knows about one container (read with `status()`)."""

    spec: ContainerSpec
    restart_count: int = 0
    health: HealthStatus | None = None
    last_exit_code: int | None = None
    last_oom_killed: bool = False
    gave_up: bool = False
    cancel: trio.CancelScope | None = None
    done: trio.Event | None = None


class Supervisor:
    def __init__(
        self,
        runtime: ContainerRuntime,
        *,
        name: str = "node",
        rng: random.Random,
        events: trio.MemorySendChannel[SupervisorEvent] | None = None,
        prober: HealthProber | None = None,
        stop_grace: float = 10.0,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.rng = rng
        self._events = events
        self.prober = prober if prober is not None else RuntimeProber(runtime)
        self.stop_grace = stop_grace
        self._watched: dict[str, Supervised] = {}
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------ service

    async def run(
        self,
        keep: Callable[[ContainerSpec], bool] | None = None,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Adopt what survives from before, then supervise until cancelled.

        `task_status.started()` reports the adopted ids once adoption is done.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            adopted = await self.adopt(keep)
            task_status.started(adopted)
            await trio.sleep_forever()

    def status(self, container_id: str) -> Supervised:
        try:
            return self._watched[container_id]
        except KeyError:
            raise ContainerNotFound(f"{container_id!r} is not supervised here", id=container_id) from None

    def supervised(self) -> list[str]:
        return sorted(self._watched)

    async def adopt(self, keep: Callable[[ContainerSpec], bool] | None = None) -> list[str]:
        """Take over our surviving containers; delete ours that `keep` rejects."""
        await self.runtime.sweep()
        adopted = []
        for state in await self.runtime.list():
            if state.id in self._watched:
                continue
            try:
                spec = await self.runtime.inspect(state.id)
            except ContainerNotFound:
                continue
            if spec.labels.get(OWNER_LABEL) != self.name:
                continue
            if keep is not None and not keep(spec):
                await self.runtime.delete(state.id)
                await self._emit(Removed(id=state.id, reason="no longer owned"))
                continue
            await self._emit(Adopted(id=state.id, status=state.status))
            self._spawn(spec, state)
            adopted.append(state.id)
        log.info("sandbox.adopted", extra={"fields": {"supervisor": self.name, "ids": adopted}})
        return adopted

    async def ensure(self, spec: ContainerSpec) -> None:
        """Create (if needed) and keep `spec` running per its restart policy.

        Idempotent for reconcilers: ensuring an already supervised (or adopted)
        container with the same spec does nothing; a different spec under the
        same id is a Conflict (remove it first).
        """
        spec = msgspec.structs.replace(spec, labels={**spec.labels, OWNER_LABEL: self.name})
        if spec.id in self._watched:
            if self._watched[spec.id].spec == spec:
                return
            raise ContainerExists(f"{spec.id!r} is supervised with a different spec", id=spec.id)
        try:
            state = await self.runtime.create(spec)
        except ContainerExists:
            existing = await self.runtime.inspect(spec.id)
            if existing.labels.get(OWNER_LABEL) != self.name:
                raise
            state = await self.runtime.state(spec.id)
            spec = existing
        self._spawn(spec, state)

    async def remove(self, container_id: str, reason: str = "removed") -> None:
        """Stop supervising, stop (SIGTERM, grace, SIGKILL) and delete the container."""
        entry = self._watched.pop(container_id, None)
        if entry is not None and entry.cancel is not None:
            entry.cancel.cancel()
            if entry.done is not None:
                await entry.done.wait()
        try:
            await self.runtime.stop(container_id, self.stop_grace)
            await self.runtime.delete(container_id)
        except ContainerNotFound:
            pass
        await self._emit(Removed(id=container_id, reason=reason))

    # ------------------------------------------------------------ watcher

    def _spawn(self, spec: ContainerSpec, state: ContainerState) -> None:
        if self._nursery is None:
            raise SandboxError("Supervisor.run() is not running")
        entry = Supervised(spec=spec, cancel=trio.CancelScope(), done=trio.Event())
        self._watched[spec.id] = entry
        self._nursery.start_soon(self._watch, entry, state)

    async def _emit(self, event: SupervisorEvent) -> None:
        log.info(f"sandbox.{type(event).__name__.lower()}", extra={"fields": msgspec.structs.asdict(event)})
        if self._events is not None:
            await self._events.send(event)

    async def _watch(self, entry: Supervised, state: ContainerState) -> None:
        """One container's watcher; whatever its runtime does, it never takes the supervisor down."""
        assert entry.cancel is not None and entry.done is not None
        cid = entry.spec.id
        try:
            with entry.cancel:
                await self._watch_loop(entry, state)
        except ContainerNotFound:
            if self._watched.get(cid) is entry:
                del self._watched[cid]
            await self._emit(Removed(id=cid, reason="deleted outside the supervisor"))
        except CloudlessError as e:
            log.warning("sandbox.watch_failed", extra={"fields": {"id": cid, "error": str(e)}})
            if self._watched.get(cid) is entry:
                del self._watched[cid]
            await self._emit(WatchFailed(id=cid, error=str(e)))
        finally:
            entry.done.set()

    async def _watch_loop(self, entry: Supervised, state: ContainerState) -> None:
        cid = entry.spec.id
        policy = entry.spec.restart
        backoff_step = 0
        running = state.status == "running"
        if state.status == "exited":
            # Ended while nobody watched (node down): decide as if we saw it exit.
            entry.last_exit_code, entry.last_oom_killed = state.exit_code, state.oom_killed
            if not await self._after_exit(entry, state.exit_code, backoff_step):
                return
            backoff_step += 1
        while True:
            if not running:
                try:
                    started = await self.runtime.start(cid)
                except (SandboxError, ContainerStateError) as e:
                    await self._emit(StartFailed(id=cid, error=str(e)))
                    entry.last_exit_code = None
                    if not await self._after_exit(entry, None, backoff_step):
                        return
                    backoff_step += 1
                    continue
                await self._emit(Started(id=cid, pid=started.pid, restart_count=entry.restart_count))
            running = False
            run_began = trio.current_time()
            final = await self._run_once(entry)
            entry.last_exit_code, entry.last_oom_killed = final.exit_code, final.oom_killed
            await self._emit(Exited(id=cid, exit_code=final.exit_code, oom_killed=final.oom_killed))
            if final.oom_killed:
                await self._emit(OomKilled(id=cid))
            if trio.current_time() - run_began >= policy.backoff_reset_after:
                backoff_step = 0
            if not await self._after_exit(entry, final.exit_code, backoff_step):
                return
            backoff_step += 1

    async def _after_exit(self, entry: Supervised, exit_code: int | None, backoff_step: int) -> bool:
        """Sleep the backoff and return True to restart, or emit GaveUp and return False."""
        delay = restart_delay(entry.spec.restart, entry.restart_count, exit_code, backoff_step, self.rng)
        if delay is None:
            entry.gave_up = True
            await self._emit(GaveUp(id=entry.spec.id, exit_code=exit_code, restart_count=entry.restart_count))
            return False
        entry.restart_count += 1
        await self._emit(Restarting(id=entry.spec.id, attempt=entry.restart_count, backoff=delay))
        await trio.sleep(delay)
        return True

    async def _run_once(self, entry: Supervised) -> ContainerState:
        """Wait for the run to end, killing it first if it turns unhealthy."""
        cid = entry.spec.id
        check = entry.spec.health
        entry.health = "starting" if check is not None else None
        unhealthy = False
        async with trio.open_nursery() as nursery:

            async def health_loop() -> None:
                nonlocal unhealthy
                assert check is not None
                tracker = HealthTracker(check, trio.current_time())
                while True:
                    await trio.sleep(check.interval)
                    ok = False
                    with trio.move_on_after(check.timeout):
                        ok = await self.prober.probe(cid, check)
                    before = tracker.status
                    status = tracker.record(trio.current_time(), ok)
                    entry.health = status
                    if status != before:
                        await self._emit(HealthChanged(id=cid, status=status, failures=tracker.failures))
                    if status == "unhealthy" and before != "unhealthy":
                        await self._emit(Unhealthy(id=cid, failures=tracker.failures))
                        if entry.spec.restart.mode != "never":
                            unhealthy = True
                            try:
                                await self.runtime.stop(cid, self.stop_grace)
                            except (SandboxError, ContainerStateError):
                                pass  # it exited on its own meanwhile; wait() reports it
                            return
                        # With "never" an unhealthy container keeps running, reported as such.

            if check is not None:
                nursery.start_soon(health_loop)
            final = await self.runtime.wait(cid)
            nursery.cancel_scope.cancel()
        if unhealthy and final.exit_code == 0:
            # Killed for being unhealthy counts as a failure even if it exited cleanly on SIGTERM.
            final = msgspec.structs.replace(final, exit_code=None)
        return final
