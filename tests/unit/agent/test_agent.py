"""The agent over the memory twins (MemoryRuntime, MemorySource, MemoryRootfs)
under trio's MockClock: assignment → containers → reports, disconnected mode
(a reboot with no coordinator restarts the persisted allocations) and
reconciliation on reconnection (no duplicates)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from cloudless.agent.agent import Agent
from cloudless.agent.containers import MemoryRootfs
from cloudless.agent.local import LocalAllocations
from cloudless.agent.messages import AssignedAllocation, NodeAllocations
from cloudless.agent.source import MemorySource
from cloudless.sandbox.memory import MemoryRuntime, ScriptedRun
from cloudless.sandbox.runtime import ContainerSpec, SandboxError
from cloudless.state.workload import Allocation, RestartPolicy, WorkloadSpec, validate

NODE = "n1"


@pytest.fixture
def clock():
    return trio.testing.MockClock(autojump_threshold=0)


SPEC = validate(WorkloadSpec(name="web", image="busybox:latest", command=("sleep", "1000"), replicas=2))


def assigned(*ids: str, desired: str = "run", spec: WorkloadSpec = SPEC) -> tuple[AssignedAllocation, ...]:
    return tuple(
        AssignedAllocation(
            Allocation(id=i, workload=spec.name, version=spec.version, node=NODE, replica=n), desired, spec
        )
        for n, i in enumerate(ids)
    )


async def inline(fn, *args):
    return fn(*args)


def agent_for(runtime: MemoryRuntime, source: MemorySource, tmp_path) -> Agent:
    return Agent(
        NODE,
        runtime,
        source,
        LocalAllocations(tmp_path / "agent"),
        MemoryRootfs(),
        rng=random.Random(1),
        stop_grace=1.0,
        in_thread=inline,
    )


async def settle(seconds: float = 2.0) -> None:
    await trio.sleep(seconds)


async def running(runtime: MemoryRuntime) -> set[str]:
    return {s.id for s in await runtime.list() if s.status == "running"}


async def test_assigned_allocations_start_and_are_reported_running(clock, tmp_path):
    runtime, source = MemoryRuntime(), MemorySource()
    source.publish(NodeAllocations(NODE, 5, assigned("web-0-aa", "web-1-bb")))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_for(runtime, source, tmp_path).run)
        await settle()
        assert await running(runtime) == {"web-0-aa", "web-1-bb"}
        latest = source.latest()
        assert latest["web-0-aa"].state == "running" and latest["web-1-bb"].state == "running"
        # The container runs the workload's command with its identity in the environment.
        spec = await runtime.inspect("web-0-aa")
        assert spec.args == ["sleep", "1000"]
        assert spec.env["HOSTNAME"] == "web-0-aa" and spec.env["CLOUDLESS_REPLICA"] == "0"
        nursery.cancel_scope.cancel()


async def test_unassigned_or_stopped_allocations_are_removed_and_reported_exited(clock, tmp_path):
    runtime, source = MemoryRuntime(), MemorySource()
    source.publish(NodeAllocations(NODE, 5, assigned("web-0-aa", "web-1-bb")))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_for(runtime, source, tmp_path).run)
        await settle()
        source.publish(NodeAllocations(NODE, 6, assigned("web-0-aa") + assigned("web-1-bb", desired="stop")))
        await settle(15)
        assert await running(runtime) == {"web-0-aa"}
        assert {s.id for s in await runtime.list()} == {"web-0-aa"}
        assert source.latest()["web-1-bb"].state == "exited"
        source.publish(NodeAllocations(NODE, 7, ()))
        await settle(15)
        assert await runtime.list() == []
        nursery.cancel_scope.cancel()


async def test_failing_container_is_reported_failed_once_the_restart_policy_gives_up(clock, tmp_path):
    runtime, source = MemoryRuntime(), MemorySource()
    spec = validate(
        WorkloadSpec(name="job", image="busybox:latest", restart=RestartPolicy(mode="on-failure", max_retries=2))
    )
    runtime.script("job-0-aa", *(ScriptedRun(after=1.0, exit_code=3) for _ in range(5)))
    source.publish(NodeAllocations(NODE, 5, assigned("job-0-aa", spec=spec)))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_for(runtime, source, tmp_path).run)
        await settle(60)
        report = source.latest()["job-0-aa"]
        assert report.state == "failed" and report.exit_code == 3 and report.restarts == 2
        nursery.cancel_scope.cancel()


async def test_missing_image_is_reported_failed_with_the_reason(clock, tmp_path):
    runtime, source = MemoryRuntime(), MemorySource()
    agent = agent_for(runtime, source, tmp_path)
    agent.rootfs.missing.add("busybox:latest")
    source.publish(NodeAllocations(NODE, 5, assigned("web-0-aa")))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await settle()
        report = source.latest()["web-0-aa"]
        assert report.state == "failed" and "not on this node" in report.message
        nursery.cancel_scope.cancel()


class CreateFails(MemoryRuntime):
    """The memory twin whose bundle creation fails (a full disk, a bad mount)."""

    async def create(self, spec):
        await trio.lowlevel.checkpoint()
        raise SandboxError(f"cannot write the bundle of {spec.id}: no space left on device", id=spec.id)


async def test_a_container_that_cannot_be_created_releases_its_root(clock, tmp_path):
    runtime, source = CreateFails(), MemorySource()
    agent = agent_for(runtime, source, tmp_path)
    source.publish(NodeAllocations(NODE, 5, assigned("web-0-aa")))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await settle()
        report = source.latest()["web-0-aa"]
        assert report.state == "failed" and "no space left" in report.message
        assert agent.rootfs.prepared == {}  # the prepared root (an overlay mount on a real node) is gone
        nursery.cancel_scope.cancel()


async def test_a_failed_start_keeps_the_root_of_a_container_that_exists(clock, tmp_path):
    runtime, source = MemoryRuntime(), MemorySource()
    agent = agent_for(runtime, source, tmp_path)
    # Someone else's container under the id: ensure() refuses it, and its root stays in use.
    await runtime.create(ContainerSpec(id="web-0-aa", rootfs="/memory/rootfs/web-0-aa", args=["sh"], labels={}))
    agent.rootfs.prepared["web-0-aa"] = "busybox:latest"
    source.publish(NodeAllocations(NODE, 5, assigned("web-0-aa")))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await settle()
        assert source.latest()["web-0-aa"].state == "failed"
        assert "web-0-aa" in agent.rootfs.prepared
        nursery.cancel_scope.cancel()


async def test_restart_while_disconnected_adopts_running_containers_without_duplicates(clock, tmp_path):
    runtime, source = MemoryRuntime(), MemorySource()
    source.publish(NodeAllocations(NODE, 5, assigned("web-0-aa", "web-1-bb")))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_for(runtime, source, tmp_path).run)
        await settle()
        nursery.cancel_scope.cancel()  # the node process dies; its containers keep running
    source.disconnect()
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_for(runtime, source, tmp_path).run)
        await settle(10)
        assert await running(runtime) == {"web-0-aa", "web-1-bb"}
        assert runtime.start_count("web-0-aa") == 1 and runtime.start_count("web-1-bb") == 1
        nursery.cancel_scope.cancel()


async def test_reboot_without_any_coordinator_restarts_the_persisted_allocations(clock, tmp_path):
    source = MemorySource()
    source.publish(NodeAllocations(NODE, 5, assigned("web-0-aa", "web-1-bb")))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_for(MemoryRuntime(), source, tmp_path).run)
        await settle()
        nursery.cancel_scope.cancel()
    source.disconnect()
    rebooted = MemoryRuntime()  # a reboot: no container survived
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_for(rebooted, source, tmp_path).run)
        await settle(10)
        assert await running(rebooted) == {"web-0-aa", "web-1-bb"}
        nursery.cancel_scope.cancel()


async def test_reconnection_stops_what_the_cluster_replaced_and_keeps_the_rest(clock, tmp_path):
    runtime, source = MemoryRuntime(), MemorySource()
    source.publish(NodeAllocations(NODE, 5, assigned("web-0-aa", "web-1-bb")))
    async with trio.open_nursery() as nursery:
        agent = agent_for(runtime, source, tmp_path)
        await nursery.start(agent.run)
        await settle()
        source.disconnect()
        await settle(30)
        assert await running(runtime) == {"web-0-aa", "web-1-bb"}  # cut off: keeps running
        assert not agent.connected
        # Meanwhile the controller marked web-1-bb lost and replaced it elsewhere.
        source.publish(NodeAllocations(NODE, 9, assigned("web-0-aa") + assigned("web-1-bb", desired="stop")))
        reports_before = len(source.reports)
        source.reconnect()
        await settle(30)
        assert agent.connected
        assert await running(runtime) == {"web-0-aa"}
        assert runtime.start_count("web-0-aa") == 1  # never restarted
        assert source.latest()["web-1-bb"].state == "exited"
        # Everything is reported again after reconnection (the cluster may have missed it).
        again = {r.id for b in source.reports[reports_before:] for r in b.reports}
        assert "web-0-aa" in again
        nursery.cancel_scope.cancel()


async def test_local_state_survives_a_torn_temporary_file(tmp_path):
    local = LocalAllocations(tmp_path)
    value = NodeAllocations(NODE, 3, assigned("web-0-aa"))
    local.save(value)
    (tmp_path / "allocations.msgpack.tmp").write_bytes(b"\x00garbage")
    assert local.load(NODE) == value
    (tmp_path / "allocations.msgpack").write_bytes(b"\xc1")
    assert local.load(NODE).items == ()  # unreadable: empty, the cluster sends the truth


class SlowSource(MemorySource):
    """A leader that takes a second to acknowledge each report."""

    async def report(self, batch) -> None:
        await trio.sleep(1.0)
        await super().report(batch)


async def test_a_change_observed_while_a_report_is_in_flight_is_reported_too(clock, tmp_path):
    runtime, source = MemoryRuntime(), SlowSource()
    spec = validate(WorkloadSpec(name="job", image="busybox:latest", restart=RestartPolicy(mode="never")))
    runtime.script("job-0-aa", ScriptedRun(after=0.5, exit_code=0))
    source.publish(NodeAllocations(NODE, 5, assigned("job-0-aa", spec=spec)))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent_for(runtime, source, tmp_path).run)
        await settle(10)
        assert source.latest()["job-0-aa"].state == "exited"  # not stuck at what the first batch said
        nursery.cancel_scope.cancel()
