"""Supervisor behaviour against the memory twin under trio's MockClock (autojump)."""

import math
import random

import pytest
import trio

from cloudless.sandbox.memory import MemoryRuntime, ScriptedRun
from cloudless.sandbox.runtime import ContainerSpec, HealthCheck, RestartPolicy, SandboxError
from cloudless.sandbox.supervisor import (
    OWNER_LABEL,
    Adopted,
    Exited,
    GaveUp,
    OomKilled,
    Removed,
    Restarting,
    Started,
    StartFailed,
    Supervisor,
    Unhealthy,
    restart_delay,
)

SEED = 1234


def spec(cid="web", restart=RestartPolicy(), health=None, labels=None):
    return ContainerSpec(
        id=cid,
        rootfs="/nonexistent",
        args=["server"],
        network="host",
        restart=restart,
        health=health,
        labels=labels or {},
    )


class Harness:
    def __init__(self, runtime=None, name="node"):
        self.runtime = runtime or MemoryRuntime()
        self.send, self.recv = trio.open_memory_channel(math.inf)
        self.sup = Supervisor(
            self.runtime, name=name, rng=random.Random(SEED), events=self.send, prober=self.runtime.prober()
        )

    def drain(self):
        out = []
        while True:
            try:
                out.append(self.recv.receive_nowait())
            except trio.WouldBlock:
                return out

    async def until(self, predicate, timeout=3600):
        """Collect events until `predicate(event)` holds (mock time)."""
        seen = []
        with trio.fail_after(timeout):
            while True:
                ev = await self.recv.receive()
                seen.append(ev)
                if predicate(ev):
                    return seen


# ---------------------------------------------------------------- the pure policy


@pytest.mark.parametrize(
    "mode,code,restarts,expect_restart",
    [
        ("never", 1, 0, False),
        ("always", 0, 5, True),
        ("always", 1, 100, True),
        ("on-failure", 0, 0, False),
        ("on-failure", 1, 2, True),
        ("on-failure", 1, 3, False),  # max_retries reached
        ("on-failure", None, 0, True),  # a start failure counts as failure
    ],
)
def test_restart_delay_follows_policy(mode, code, restarts, expect_restart):
    policy = RestartPolicy(mode=mode, max_retries=3)
    delay = restart_delay(policy, restarts, code, 0, random.Random(SEED))
    assert (delay is not None) == expect_restart


def test_backoff_is_exponential_with_equal_jitter_and_capped():
    policy = RestartPolicy(mode="always", backoff_initial=1.0, backoff_max=16.0)
    rng = random.Random(SEED)
    for step in range(8):
        expected_step = min(16.0, 2.0**step)
        for _ in range(50):
            d = restart_delay(policy, 0, 1, step, rng)
            assert expected_step / 2 <= d <= expected_step, (step, d)
    # jitter actually varies
    values = {restart_delay(policy, 0, 1, 3, rng) for _ in range(20)}
    assert len(values) > 1


def test_backoff_is_reproducible_from_seed():
    policy = RestartPolicy(mode="always")
    a = [restart_delay(policy, 0, 1, s, random.Random(7)) for s in range(5)]
    b = [restart_delay(policy, 0, 1, s, random.Random(7)) for s in range(5)]
    assert a == b


# ---------------------------------------------------------------- restarts


async def test_on_failure_restarts_up_to_max_then_gives_up(autojump_clock):
    h = Harness()
    h.runtime.script("web", *[ScriptedRun(after=1.0, exit_code=2)] * 5)
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(
            spec(restart=RestartPolicy(mode="on-failure", max_retries=2, backoff_initial=1, backoff_max=4))
        )
        events = await h.until(lambda e: isinstance(e, GaveUp))
        n.cancel_scope.cancel()
    starts = [e for e in events if isinstance(e, Started)]
    exits = [e for e in events if isinstance(e, Exited)]
    assert len(starts) == 3  # first run + 2 retries
    assert [e.exit_code for e in exits] == [2, 2, 2]
    assert [e.restart_count for e in starts] == [0, 1, 2]
    assert h.runtime.start_count("web") == 3
    gave_up = events[-1]
    assert gave_up.restart_count == 2 and gave_up.exit_code == 2


async def test_on_failure_does_not_restart_a_clean_exit(autojump_clock):
    h = Harness()
    h.runtime.script("job", ScriptedRun(after=5.0, exit_code=0))
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec("job", restart=RestartPolicy(mode="on-failure", max_retries=5)))
        events = await h.until(lambda e: isinstance(e, GaveUp))
        n.cancel_scope.cancel()
    assert [type(e) for e in events] == [Started, Exited, GaveUp]
    assert h.runtime.start_count("job") == 1


async def test_always_restarts_clean_exits_with_growing_backoff(autojump_clock):
    h = Harness()
    h.runtime.script("web", *[ScriptedRun(after=0.1, exit_code=0)] * 5)
    policy = RestartPolicy(mode="always", backoff_initial=1.0, backoff_max=8.0)
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec(restart=policy))
        events = await h.until(lambda e: isinstance(e, Restarting) and e.attempt == 5)
        n.cancel_scope.cancel()
    backoffs = [e.backoff for e in events if isinstance(e, Restarting)]
    caps = [1, 2, 4, 8, 8]
    for b, cap in zip(backoffs, caps, strict=True):
        assert cap / 2 <= b <= cap


async def test_backoff_resets_after_a_long_run(autojump_clock):
    h = Harness()
    h.runtime.script("web", ScriptedRun(after=0.1, exit_code=1), ScriptedRun(after=0.1, exit_code=1),
                     ScriptedRun(after=60.0, exit_code=1), ScriptedRun(after=0.1, exit_code=1))  # fmt: skip
    policy = RestartPolicy(mode="always", backoff_initial=1.0, backoff_max=64.0, backoff_reset_after=10.0)
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec(restart=policy))
        events = await h.until(lambda e: isinstance(e, Restarting) and e.attempt == 3)
        n.cancel_scope.cancel()
    backoffs = [e.backoff for e in events if isinstance(e, Restarting)]
    assert 0.5 <= backoffs[0] <= 1 and 1 <= backoffs[1] <= 2
    assert 0.5 <= backoffs[2] <= 1  # the 60 s run reset the step


async def test_never_policy_leaves_container_exited(autojump_clock):
    h = Harness()
    h.runtime.script("once", ScriptedRun(after=2.0, exit_code=7))
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec("once"))
        events = await h.until(lambda e: isinstance(e, GaveUp))
        n.cancel_scope.cancel()
    assert [type(e) for e in events] == [Started, Exited, GaveUp]
    assert (await h.runtime.state("once")).exit_code == 7
    assert h.sup.status("once").gave_up


async def test_oom_kill_is_reported_and_restarted(autojump_clock):
    h = Harness()
    h.runtime.script("hog", ScriptedRun(after=1.0, exit_code=137, oom_killed=True))
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec("hog", restart=RestartPolicy(mode="on-failure", max_retries=1)))
        events = await h.until(lambda e: isinstance(e, Started) and e.restart_count == 1)
        n.cancel_scope.cancel()
    exited = next(e for e in events if isinstance(e, Exited))
    assert exited.oom_killed and exited.exit_code == 137
    assert any(isinstance(e, OomKilled) for e in events)


async def test_start_failure_is_retried_with_backoff(autojump_clock):
    h = Harness()
    h.runtime.script("web", ScriptedRun(start_error=SandboxError("runc create failed")), ScriptedRun())
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec(restart=RestartPolicy(mode="on-failure", max_retries=3)))
        events = await h.until(lambda e: isinstance(e, Started))
        n.cancel_scope.cancel()
    assert [type(e) for e in events] == [StartFailed, Restarting, Started]


# ---------------------------------------------------------------- health


async def test_failing_health_check_restarts_container_after_retries(autojump_clock):
    h = Harness()
    check = HealthCheck(kind="tcp", port=80, interval=5.0, timeout=1.0, retries=3)
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec(restart=RestartPolicy(mode="always"), health=check))
        await h.until(lambda e: isinstance(e, Started))
        t0 = trio.current_time()
        h.runtime.script_health("web", True, False, False, False)
        events = await h.until(lambda e: isinstance(e, Started))
        n.cancel_scope.cancel()
    kinds = [type(e).__name__ for e in events]
    assert "Unhealthy" in kinds and kinds.index("Unhealthy") < kinds.index("Exited")
    unhealthy = next(e for e in events if isinstance(e, Unhealthy))
    assert unhealthy.failures == 3
    exited = next(e for e in events if isinstance(e, Exited))
    assert exited.exit_code == 143  # SIGTERMed for health: a failure exit
    assert h.runtime.start_count("web") == 2
    # 1 pass + 3 fails at 5 s intervals: not unhealthy before 20 s
    assert trio.current_time() - t0 >= 20


async def test_health_failures_in_start_period_do_not_count(autojump_clock):
    h = Harness()
    check = HealthCheck(kind="exec", command=["true"], interval=1.0, timeout=0.5, retries=2, start_period=10.0)
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec(restart=RestartPolicy(mode="always"), health=check))
        await h.until(lambda e: isinstance(e, Started))
        h.runtime.script_health("web", *[False] * 9, then=True)
        await trio.sleep(30)
        n.cancel_scope.cancel()
    events = h.drain()
    assert not any(isinstance(e, Unhealthy) for e in events)
    assert h.sup.status("web").health == "healthy"
    assert h.runtime.start_count("web") == 1


async def test_hung_probe_counts_as_failure(autojump_clock):
    class HangingProber:
        async def probe(self, cid, check):
            await trio.sleep_forever()

    h = Harness()
    h.sup.prober = HangingProber()
    check = HealthCheck(kind="tcp", port=80, interval=1.0, timeout=2.0, retries=2)
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec(restart=RestartPolicy(mode="on-failure", max_retries=1), health=check))
        events = await h.until(lambda e: isinstance(e, Unhealthy))
        n.cancel_scope.cancel()
    assert events[-1].failures == 2


# ---------------------------------------------------------------- adoption


async def test_adoption_watches_running_container_without_starting_a_second(autojump_clock):
    runtime = MemoryRuntime()
    first = Harness(runtime)
    async with trio.open_nursery() as n:
        await n.start(first.sup.run)
        await first.sup.ensure(spec(restart=RestartPolicy(mode="always")))
        await first.until(lambda e: isinstance(e, Started))
        n.cancel_scope.cancel()  # the node process "dies"; the container keeps running
    assert (await runtime.state("web")).status == "running"

    second = Harness(runtime)
    async with trio.open_nursery() as n:
        adopted = await n.start(second.sup.run)
        assert adopted == ["web"]
        await trio.sleep(60)
        assert runtime.start_count("web") == 1  # no duplicate start
        assert [type(e) for e in second.drain()] == [Adopted]
        # and it is really supervised: a crash now is restarted
        await runtime.kill("web", 9)
        events = await second.until(lambda e: isinstance(e, Started))
        n.cancel_scope.cancel()
    assert runtime.start_count("web") == 2
    assert next(e for e in events if isinstance(e, Exited)).exit_code == 137


async def test_adoption_restarts_container_that_died_while_node_was_down(autojump_clock):
    runtime = MemoryRuntime()
    first = Harness(runtime)
    async with trio.open_nursery() as n:
        await n.start(first.sup.run)
        await first.sup.ensure(spec(restart=RestartPolicy(mode="on-failure", max_retries=3)))
        await first.until(lambda e: isinstance(e, Started))
        n.cancel_scope.cancel()
    await runtime.kill("web", 9)  # dies while nobody watches

    second = Harness(runtime)
    async with trio.open_nursery() as n:
        await n.start(second.sup.run)
        events = await second.until(lambda e: isinstance(e, Started))
        n.cancel_scope.cancel()
    assert isinstance(events[0], Adopted) and events[0].status == "exited"
    assert runtime.start_count("web") == 2


async def test_adoption_deletes_containers_no_longer_owned_and_ignores_foreign(autojump_clock):
    runtime = MemoryRuntime()
    first = Harness(runtime)
    async with trio.open_nursery() as n:
        await n.start(first.sup.run)
        await first.sup.ensure(spec("keep-me"))
        await first.sup.ensure(spec("drop-me"))
        n.cancel_scope.cancel()
    await runtime.create(spec("foreign", labels={OWNER_LABEL: "someone-else"}))

    second = Harness(runtime)
    async with trio.open_nursery() as n:
        adopted = await n.start(second.sup.run, lambda s: s.id != "drop-me")
        n.cancel_scope.cancel()
    assert adopted == ["keep-me"]
    ids = [s.id for s in await runtime.list()]
    assert ids == ["foreign", "keep-me"]
    assert any(isinstance(e, Removed) and e.id == "drop-me" for e in second.drain())


async def test_remove_stops_supervision_and_deletes(autojump_clock):
    h = Harness()
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec(restart=RestartPolicy(mode="always")))
        await h.until(lambda e: isinstance(e, Started))
        await h.sup.remove("web")
        await trio.sleep(100)
        n.cancel_scope.cancel()
    assert await h.runtime.list() == []
    assert h.sup.supervised() == []
    assert not any(isinstance(e, Started) for e in h.drain())  # no restart after removal


async def test_ensure_is_idempotent_for_the_same_spec_and_refuses_a_different_one(autojump_clock):
    from cloudless.sandbox.runtime import ContainerExists

    h = Harness()
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec(restart=RestartPolicy(mode="always")))
        await h.sup.ensure(spec(restart=RestartPolicy(mode="always")))
        with pytest.raises(ContainerExists):
            await h.sup.ensure(spec(restart=RestartPolicy(mode="never")))
        await trio.sleep(1)
        n.cancel_scope.cancel()
    assert h.runtime.start_count("web") == 1


async def test_container_deleted_behind_the_supervisors_back_is_dropped_not_fatal(autojump_clock):
    h = Harness()
    async with trio.open_nursery() as n:
        await n.start(h.sup.run)
        await h.sup.ensure(spec("a", restart=RestartPolicy(mode="always")))
        await h.sup.ensure(spec("b", restart=RestartPolicy(mode="always")))
        await h.until(lambda e: isinstance(e, Started) and e.id == "b")
        await h.runtime.delete("a")
        events = await h.until(lambda e: isinstance(e, Removed))
        assert events[-1].id == "a"
        # b is still supervised: a crash is restarted
        await h.runtime.kill("b", 9)
        await h.until(lambda e: isinstance(e, Started) and e.id == "b")
        n.cancel_scope.cancel()
    assert h.sup.supervised() == ["b"]
