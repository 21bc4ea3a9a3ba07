"""Health checks: Docker HEALTHCHECK semantics of the tracker, and the exec/TCP/HTTP probes."""

import trio

from cloudless.sandbox.health import HealthTracker, RuntimeProber, http_get_status
from cloudless.sandbox.memory import MemoryRuntime
from cloudless.sandbox.runtime import ContainerSpec, ExecResult, HealthCheck


def check(**kw):
    kw.setdefault("kind", "tcp")
    kw.setdefault("port", 80)
    return HealthCheck(**kw)


def test_unhealthy_after_retries_consecutive_failures():
    t = HealthTracker(check(retries=3), started_at=0)
    assert [t.record(n, False) for n in (1, 2)] == ["starting", "starting"]
    assert t.record(3, True) == "healthy"
    assert [t.record(n, False) for n in (4, 5, 6)] == ["healthy", "healthy", "unhealthy"]
    assert t.record(7, True) == "healthy" and t.failures == 0


def test_start_period_failures_do_not_count_but_success_ends_it():
    t = HealthTracker(check(retries=1, start_period=10), started_at=100)
    assert t.record(105, False) == "starting" and t.failures == 0
    assert t.record(111, False) == "unhealthy"  # after the start period one failure is enough
    t2 = HealthTracker(check(retries=1, start_period=10), started_at=100)
    assert t2.record(101, True) == "healthy"
    assert t2.record(102, False) == "unhealthy"  # start period ended by the success


async def _serve_http(status_line: bytes, task_status=trio.TASK_STATUS_IGNORED):
    async def handler(stream):
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(status_line + b"\r\nContent-Length: 0\r\n\r\n")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_http_and_tcp_probes_against_a_local_server():
    rt = MemoryRuntime()
    async with trio.open_nursery() as n:
        ok_port = await n.start(_serve_http, b"HTTP/1.1 200 OK")
        bad_port = await n.start(_serve_http, b"HTTP/1.1 503 Service Unavailable")
        assert await http_get_status("127.0.0.1", ok_port, "/health") == 200
        for cid, port, expect in (("ok", ok_port, True), ("bad", bad_port, False)):
            await rt.create(ContainerSpec(id=cid, rootfs="/r", args=["x"], network="host"))
            await rt.start(cid)
            prober = RuntimeProber(rt)
            assert await prober.probe(cid, HealthCheck(kind="http", port=port, path="/h", timeout=5)) is expect
        assert await RuntimeProber(rt).probe("ok", HealthCheck(kind="tcp", port=ok_port, timeout=5))
        n.cancel_scope.cancel()
    # nothing listens any more: TCP refused is unhealthy, not an exception
    assert not await RuntimeProber(rt).probe("ok", HealthCheck(kind="tcp", port=ok_port, timeout=5))


async def test_exec_probe_uses_exit_code_and_not_running_is_unhealthy():
    rt = MemoryRuntime()
    rt.exec_handler = lambda cid, args: ExecResult(0 if args == ["ok"] else 1, b"", b"")
    await rt.create(ContainerSpec(id="c", rootfs="/r", args=["x"], network="none"))
    prober = RuntimeProber(rt)
    assert not await prober.probe("c", HealthCheck(kind="exec", command=["ok"]))  # not started yet
    await rt.start("c")
    assert await prober.probe("c", HealthCheck(kind="exec", command=["ok"]))
    assert not await prober.probe("c", HealthCheck(kind="exec", command=["fail"]))
    assert not await prober.probe("c", HealthCheck(kind="tcp", port=80))  # network "none": only exec works


async def test_probe_that_hangs_is_cut_at_its_timeout(autojump_clock):
    class SlowRuntime(MemoryRuntime):
        async def exec(self, container_id, args, timeout=30.0):
            await trio.sleep_forever()

    rt = SlowRuntime()
    await rt.create(ContainerSpec(id="c", rootfs="/r", args=["x"], network="none"))
    await rt.start("c")
    t0 = trio.current_time()
    assert not await RuntimeProber(rt).probe("c", HealthCheck(kind="exec", command=["x"], timeout=3))
    assert trio.current_time() - t0 == 3
