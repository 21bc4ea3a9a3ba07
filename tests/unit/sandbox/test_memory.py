"""The memory twin keeps the ContainerRuntime contract (under MockClock)."""

import pytest
import trio

from cloudless.sandbox.memory import MemoryRuntime, ScriptedRun
from cloudless.sandbox.runtime import (
    ContainerExists,
    ContainerNotFound,
    ContainerSpec,
    ContainerStateError,
    ExecResult,
    InvalidContainerSpec,
)


def spec(cid="c", **kw):
    kw.setdefault("network", "bridge")
    return ContainerSpec(id=cid, rootfs="/r", args=["run"], **kw)


async def test_lifecycle_create_start_wait_delete(autojump_clock):
    rt = MemoryRuntime()
    rt.script("c", ScriptedRun(after=5.0, exit_code=3, logs=(("stdout", "hi"),)))
    created = await rt.create(spec(labels={"k": "v"}))
    assert created.status == "created" and created.ip and created.labels == {"k": "v"}
    running = await rt.start("c")
    assert running.status == "running" and running.pid
    t0 = trio.current_time()
    final = await rt.wait("c")
    assert trio.current_time() - t0 == pytest.approx(5.0)
    assert (final.status, final.exit_code) == ("exited", 3)
    assert [r.text for r in await rt.read_logs("c")] == ["hi"]
    await rt.delete("c")
    with pytest.raises(ContainerNotFound):
        await rt.state("c")


async def test_state_reflects_scripted_exit_without_anyone_waiting(autojump_clock):
    rt = MemoryRuntime()
    rt.script("c", ScriptedRun(after=1.0, exit_code=0))
    await rt.create(spec())
    await rt.start("c")
    await trio.sleep(2)
    assert (await rt.state("c")).status == "exited"


async def test_kill_exits_with_128_plus_signal_and_errors_when_not_running(autojump_clock):
    rt = MemoryRuntime()
    await rt.create(spec())
    with pytest.raises(ContainerStateError):
        await rt.wait("c")  # never started
    await rt.start("c")
    with pytest.raises(ContainerStateError):
        await rt.start("c")  # already running
    await rt.kill("c", 9)
    assert (await rt.wait("c")).exit_code == 137
    with pytest.raises(ContainerStateError):
        await rt.kill("c", 15)
    assert (await rt.stop("c")).exit_code == 137  # stop on an exited container is a no-op


async def test_duplicate_and_invalid_specs_are_refused():
    rt = MemoryRuntime()
    await rt.create(spec())
    with pytest.raises(ContainerExists):
        await rt.create(spec())
    with pytest.raises(InvalidContainerSpec):
        await rt.create(spec("bad/id"))


async def test_exec_uses_handler_and_needs_a_running_container(autojump_clock):
    rt = MemoryRuntime()
    rt.exec_handler = lambda cid, args: ExecResult(len(args), b"out", b"")
    await rt.create(spec())
    with pytest.raises(ContainerStateError):
        await rt.exec("c", ["a"])
    await rt.start("c")
    assert await rt.exec("c", ["a", "b"]) == ExecResult(2, b"out", b"")


async def test_follow_logs_yields_new_lines(autojump_clock):
    rt = MemoryRuntime()
    await rt.create(spec())
    await rt.start("c")
    got = []

    async def follow():
        async for rec in rt.follow_logs("c"):
            got.append(rec.text)
            if len(got) == 3:
                return

    async with trio.open_nursery() as n:
        n.start_soon(follow)
        for text in ("a", "b", "c"):
            await trio.sleep(1)
            rt.emit_log("c", "stdout", text)
    assert got == ["a", "b", "c"]


async def test_restart_runs_next_script_and_keeps_address(autojump_clock):
    rt = MemoryRuntime()
    rt.script("c", ScriptedRun(after=1, exit_code=1), ScriptedRun(after=1, exit_code=0))
    first = await rt.create(spec())
    await rt.start("c")
    assert (await rt.wait("c")).exit_code == 1
    again = await rt.start("c")
    assert again.ip == first.ip
    assert (await rt.wait("c")).exit_code == 0
    assert rt.start_count("c") == 2
