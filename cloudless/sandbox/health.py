"""Health checks: a pure tracker of probe results, and probes (exec, TCP, HTTP).

Semantics follow Docker's HEALTHCHECK: the first probe runs one `interval`
after start; a probe that passes its `timeout` failed; `retries` consecutive
failures make the container unhealthy; failures inside `start_period` do not
count, but a success there ends the start period (the container is healthy).
"""

from __future__ import annotations

from typing import Literal, Protocol

import trio

from cloudless.errors import CloudlessError
from cloudless.sandbox.runtime import ContainerRuntime, HealthCheck, SandboxError

HealthStatus = Literal["starting", "healthy", "unhealthy"]


class HealthTracker:
    """Consecutive-failure counting with a start period; time is an argument."""

    def __init__(self, check: HealthCheck, started_at: float) -> None:
        self.check = check
        self.started_at = started_at
        self.status: HealthStatus = "starting"
        self.failures = 0  # consecutive, counted ones

    def record(self, now: float, ok: bool) -> HealthStatus:
        if ok:
            self.failures = 0
            self.status = "healthy"
            return self.status
        in_start_period = self.status == "starting" and now - self.started_at < self.check.start_period
        if not in_start_period:
            self.failures += 1
            if self.failures >= self.check.retries:
                self.status = "unhealthy"
        return self.status


class HealthProber(Protocol):
    async def probe(self, container_id: str, check: HealthCheck) -> bool:
        """One probe; True if healthy. Must return within check.timeout (callers also enforce it)."""


async def _tcp_connect(host: str, port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(host, port)


async def http_get_status(host: str, port: int, path: str) -> int:
    """Status code of a minimal HTTP/1.0 GET (no redirects, body ignored)."""
    stream = await _tcp_connect(host, port)
    async with stream:
        request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: cloudless-health\r\n\r\n"
        await stream.send_all(request.encode())
        head = b""
        while b"\r\n" not in head and len(head) < 8192:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            head += chunk
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or not line[0].startswith(b"HTTP/") or not line[1].isdigit():
        raise SandboxError(f"not an HTTP response from {host}:{port}", head=head[:80])
    return int(line[1])


class RuntimeProber:
    """Probes a real container: exec through the runtime, TCP/HTTP to its address.

    Bridge containers are probed at their bridge address, host-network ones at
    127.0.0.1; a container with network "none" can only be checked by exec.
    """

    def __init__(self, runtime: ContainerRuntime) -> None:
        self.runtime = runtime

    async def probe(self, container_id: str, check: HealthCheck) -> bool:
        with trio.move_on_after(check.timeout):
            try:
                return await self._probe(container_id, check)
            except (OSError, CloudlessError):
                return False  # unreachable, not running, exec failed: all unhealthy
        return False

    async def _probe(self, container_id: str, check: HealthCheck) -> bool:
        if check.kind == "exec":
            result = await self.runtime.exec(container_id, list(check.command), timeout=check.timeout)
            return result.exit_code == 0
        spec = await self.runtime.inspect(container_id)
        if spec.network == "none":
            return False
        host = "127.0.0.1"
        if spec.network == "bridge":
            state = await self.runtime.state(container_id)
            if not state.ip:
                return False
            host = state.ip
        if check.kind == "tcp":
            stream = await _tcp_connect(host, check.port)
            await stream.aclose()
            return True
        status = await http_get_status(host, check.port, check.path)
        return 200 <= status < 400
