"""200 unauthenticated enrollment connections against a real node: it keeps
at most its cap of them, its memory stays bounded, and a real join still
works once the flood ends (the issue measured 1.47 GiB and 200 held open)."""

from __future__ import annotations

import trio

from cloudless.transport.base import ConnectionLost
from cloudless.transport.tls import MAX_ENROLLEES, connect_enrollment
from tests.harness.node_cluster import NodeProcess, bootstrap, free_port, join, status, wait_for

FLOOD = 200


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _flood(address: tuple[str, int]) -> list:
    opened: list = []

    async def one() -> None:
        try:
            conn, _ = await connect_enrollment(address, timeout=10)
        except ConnectionLost:
            return
        opened.append(conn)

    async with trio.open_nursery() as nursery:
        for _ in range(FLOOD):
            nursery.start_soon(one)
    return opened


async def _still_open(conns: list) -> int:
    async def alive(conn) -> bool:
        with trio.move_on_after(1.5):
            try:
                await conn.accept_stream()
            except ConnectionLost:
                return False
        return True

    results: list[bool] = []

    async def check(conn) -> None:
        results.append(await alive(conn))

    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(check, conn)
    return sum(results)


def test_an_enrollment_flood_is_capped_and_bounded(tmp_path) -> None:
    node = NodeProcess(tmp_path / "node1", free_port(), "node1")
    config = bootstrap(node)
    try:
        host, port = node.address.rsplit(":", 1)
        before = _rss_mib(node.proc.pid)

        async def run() -> tuple[int, float]:
            conns = await _flood((host, int(port)))
            try:
                held = await _still_open(conns)
                return held, _rss_mib(node.proc.pid)
            finally:
                for conn in conns:
                    await conn.aclose()

        held, during = trio.run(run)
        assert held <= MAX_ENROLLEES, held
        assert during - before < 64, (before, during)  # MiB
        # The node still serves, and a real join goes through.
        second = NodeProcess(tmp_path / "node2", free_port(), "node2")
        join(config, node, second)
        try:
            wait_for(
                lambda: any(m["id"] == "node2" and m["state"] == "alive" for m in status(config)["members"]),
                60,
                "node2 to join after the flood",
            )
        finally:
            second.stop()
    finally:
        node.stop()
