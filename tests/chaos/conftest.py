"""Fixtures of the chaos harness self-tests: tiny programs run in namespace hosts.

Test modules cannot import each other under --import-mode=importlib, so the
helpers come as the `programs` fixture.
"""

import sys
from pathlib import Path

import pytest
import trio

from tests.harness.chaos import ChaosCluster, ProcessSpec, wait_tcp
from tests.harness.waiting import wait_until

PORT = 7411


def _ready_after(banner: str):
    """Ready when the port answers and this start has logged its banner.

    The programs listen before they log, so a connect alone can win the race
    with the banner, and a kill -9 right after would lose the line.
    """

    async def ready(proc) -> None:
        await wait_tcp(proc.host.ip, proc.spec.port, timeout_s=10)
        with trio.fail_after(10):
            await wait_until(lambda: proc.log_path.read_text().count(banner) >= proc.starts, interval=0.02)

    return ready


class Programs:
    path = str(Path(__file__).with_name("programs.py"))
    port = PORT
    # TCP echo + UDP sink that logs every datagram it receives.
    serve = ProcessSpec(
        argv=[sys.executable, "-I", path, "serve", "{host_ip}", "{port}"], port=PORT, ready=_ready_after("serving ")
    )
    # A durable register; extra value `flags` turns it into a stale replica.
    register = ProcessSpec(
        argv=[sys.executable, "-I", path, "register", "{host_ip}", "{port}", "{data_dir}/register.jsonl", "{flags}"],
        port=PORT,
        ready=_ready_after("register on "),
    )

    def run(self, cluster: ChaosCluster, host: int, *args: str, timeout: float = 10.0):
        """Run programs.py inside a host; the completed process."""
        return cluster.net.run(host, [sys.executable, "-I", self.path, *args], timeout=timeout, check=False)

    def tcp_ok(self, cluster: ChaosCluster, src: int, dst: int, timeout: float = 0.5) -> bool:
        """Does a TCP echo from host src to host dst come back?"""
        ip = cluster.hosts[dst].ip
        return self.run(cluster, src, "tcp-echo", ip, str(PORT), "--timeout", str(timeout)).returncode == 0

    def udp_send(self, cluster: ChaosCluster, src: int, dst: int, tag: str, count: int = 5) -> None:
        out = self.run(cluster, src, "udp-send", cluster.hosts[dst].ip, str(PORT), tag, "--count", str(count))
        assert out.returncode == 0, out.stderr

    def udp_received(self, cluster: ChaosCluster, host: int, tag: str) -> int:
        """How many datagrams tagged `tag` host's sink has logged."""
        text = cluster.process(host).log_path.read_text()
        return sum(1 for line in text.splitlines() if line.startswith(f"udp {tag} "))


@pytest.fixture
def programs():
    return Programs()


@pytest.fixture
async def echo_cluster(tmp_path):
    """Three hosts, each running the TCP echo / UDP sink server."""
    async with ChaosCluster(3, tmp_path, Programs.serve) as cluster:
        await cluster.start_all()
        yield cluster
