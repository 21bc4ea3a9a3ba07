"""The runc driver: ContainerRuntime over `runc --root <our dir>` subprocesses.

Why a shim. After `runc create` the container's init is no longer anyone's
child we can wait on, and its stdout/stderr must keep flowing somewhere while
the node process restarts. So each run goes through a small per-container
shim (the `__main__` of logs.py, run as selfexec.log_shim_argv() says): it forks off a
daemon that becomes a child subreaper and runs `runc create` with the
container's stdio set to pipes it owns, then `runc start`, and reports
`ok <pid>`. Once runc exits, init is re-parented to the daemon, which pumps
those pipes into timestamped, size-rotated log segments and reaps init with
waitpid — the exact exit status (128+N for signal N). It then reads the
memory cgroup's `oom_kill` counter (v1 `memory.oom_control`, v2
`memory.events`) and writes `exit.json` (fsynced, renamed into place). The
node only ever reads files, so a restarted node finds running containers
(shim alive) and the results of those that ended while it was down.

Start latency: one shim is kept pre-started, its interpreter already up and
waiting for its arguments on stdin, so a start costs runc create + runc start
plus a few milliseconds; the next one is spawned after each start reports.
`aclose()` releases it (it also exits by itself when the node does: EOF).

State directory layout::

    <state_dir>/runc/                        runc --root
    <state_dir>/network/allocations.json     addresses (network.py)
    <state_dir>/containers/<id>/spec.json    the ContainerSpec (written first)
                               bundle/config.json
                               etc/{hosts,hostname,resolv.conf}
                               logs/*.log    records (logs.py)
                               init.pid  shim.pid  started.json  exit.json  shim.log

A container is "exited" once exit.json exists; "running" while its shim is
alive; if the shim itself is gone without a verdict, `runc state` decides.

Durability: these files survive a node *process* restart (the page cache
does), which is what adoption needs. They are deliberately not fsynced on the
create/start path (three fsyncs were the largest start cost on a busy disk):
after a *machine* crash every container is dead anyway, the agent recreates
them from its own durable allocation record, and a torn container directory
is swept as an orphan. Only the shim's exit.json is fsynced, off the start path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal as signals
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import trio

from cloudless import selfexec
from cloudless.durable import write_atomic
from cloudless.sandbox import logs as container_logs
from cloudless.sandbox.exec import RuncExecSession, open_runc_exec
from cloudless.sandbox.network import BridgeConfig, BridgeNetwork
from cloudless.sandbox.rootless import NoNetwork, RootlessHost
from cloudless.sandbox.runtime import (
    ContainerExists,
    ContainerNotFound,
    ContainerSpec,
    ContainerState,
    ContainerStateError,
    ContainerStats,
    ExecResult,
    ExecTimeout,
    LogRecord,
    RuncFailed,
    SandboxError,
    validate_spec,
)
from cloudless.sandbox.spec import NOFILE_LIMIT, HostCgroups, ResolvedUser, build_config, resolve_user

log = logging.getLogger(__name__)

WAIT_POLL = 0.02  # seconds between exit.json checks while waiting


def detect_cgroups(root: str = "/sys/fs/cgroup") -> HostCgroups:
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return HostCgroups(version=2, swap_accounting=True)
    return HostCgroups(
        version=1, swap_accounting=os.path.exists(os.path.join(root, "memory", "memory.memsw.limit_in_bytes"))
    )


def _read_inside(rootfs: str, rel: str) -> str:
    """A text file of the image, refusing symlinks that leave the rootfs."""
    path = os.path.realpath(os.path.join(rootfs, rel))
    root = os.path.realpath(rootfs)
    if not path.startswith(root + os.sep):
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def _process_alive(pid: int, start_time: int) -> bool:
    """Is `pid` alive, not a zombie, and the same process (same kernel start time)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and int(fields[19]) == start_time


class RuncRuntime:
    """ContainerRuntime driving runc; every runc call has a deadline."""

    def __init__(
        self,
        state_dir: Path,
        runc_binary: str = "runc",
        *,
        bridge: BridgeConfig | None = None,  # default: BridgeConfig.for_node(state_dir)
        log_max_bytes: int = 10 * 1024 * 1024,
        log_keep: int = 3,
        command_timeout: float = 30.0,
        shim_argv: list[str] | None = None,  # default: selfexec.log_shim_argv()
        rootless: RootlessHost | None = None,
    ) -> None:
        """`rootless`: this process is not root (rootless.py): runc runs with
        `--rootless true` in a user namespace, and there is no bridge."""
        self.state_dir = Path(state_dir).resolve()
        self.runc = shutil.which(runc_binary) or runc_binary
        self.root = self.state_dir / "runc"
        self.containers_dir = self.state_dir / "containers"
        self.root.mkdir(parents=True, exist_ok=True)
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        self.rootless = rootless
        # Global runc flags; the shim's runc calls get the same by runc's auto-detection (euid != 0).
        self._runc_flags = ["--root", str(self.root), *(["--rootless", "true"] if rootless else [])]
        self.network: BridgeNetwork | NoNetwork
        if rootless is not None:
            self.network = NoNetwork()
        else:
            bridge = bridge if bridge is not None else BridgeConfig.for_node(self.state_dir)
            self.network = BridgeNetwork(self.state_dir / "network", bridge, timeout=command_timeout)
        self.log_max_bytes = log_max_bytes
        self.log_keep = log_keep
        self.timeout = command_timeout
        self.shim_argv = list(shim_argv) if shim_argv is not None else selfexec.log_shim_argv()
        self.cgroups = detect_cgroups()
        # Relative cgroup paths nest under the cgroup runc runs in; the tag keeps
        # two runtimes on one machine (a dev cluster) apart.
        self._cgroup_parent = "cloudless-" + hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8]
        self._locks: dict[str, trio.Lock] = {}
        self._warm_shim: trio.Process | None = None
        self._creating: set[str] = set()

    # ------------------------------------------------------------ helpers

    def _dir(self, container_id: str) -> Path:
        return self.containers_dir / container_id

    def _lock(self, container_id: str) -> trio.Lock:
        return self._locks.setdefault(container_id, trio.Lock())

    def _load_spec(self, container_id: str) -> ContainerSpec:
        try:
            raw = (self._dir(container_id) / "spec.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ContainerNotFound(f"no container {container_id!r}", id=container_id) from None
        return msgspec.json.decode(raw, type=ContainerSpec)

    async def _runc(
        self, *args: str, timeout: float | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [self.runc, *self._runc_flags, *args]
        deadline = timeout or self.timeout
        with trio.move_on_after(deadline) as scope:
            proc = await trio.run_process(argv, stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
        if scope.cancelled_caught:
            raise RuncFailed(f"runc {args[0]} timed out after {deadline}s", command=" ".join(argv))
        if check and proc.returncode != 0:
            raise RuncFailed(
                f"runc {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}",
                command=" ".join(argv),
                returncode=proc.returncode,
            )
        return proc

    async def _runc_state(self, container_id: str) -> dict | None:
        proc = await self._runc("state", container_id, check=False)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout)

    def _exit_record(self, container_id: str) -> dict | None:
        try:
            return json.loads((self._dir(container_id) / "exit.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def _read_int(self, container_id: str, name: str) -> int | None:
        try:
            return int((self._dir(container_id) / name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _started_at(self, container_id: str) -> float | None:
        try:
            return json.loads((self._dir(container_id) / "started.json").read_bytes())["started_at"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _shim_alive(self, container_id: str) -> bool:
        try:
            pid, start_time = (self._dir(container_id) / "shim.pid").read_text().split()
            return _process_alive(int(pid), int(start_time))
        except (FileNotFoundError, ValueError):
            return False

    # ------------------------------------------------------------ lifecycle

    async def create(self, spec: ContainerSpec) -> ContainerState:
        validate_spec(spec)
        cdir = self._dir(spec.id)
        try:
            cdir.mkdir()  # atomic: the existence check and the claim in one step
        except FileExistsError:
            raise ContainerExists(f"container {spec.id!r} exists", id=spec.id) from None
        self._creating.add(spec.id)  # not an orphan for sweep() while spec.json is being written
        try:
            write_atomic(cdir / "spec.json", msgspec.json.encode(spec))
            (cdir / "logs").mkdir()  # exists from now on, so follow_logs can wait for the first start
            if not await trio.Path(spec.rootfs).is_dir():
                raise SandboxError(f"rootfs {spec.rootfs} is not a directory", id=spec.id)
            ip = None
            if spec.network == "bridge":
                ip = (await self.network.attach(spec.id, spec.ports)).ip
            self._write_bundle(spec)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._remove_everything(spec.id)
            raise
        finally:
            self._creating.discard(spec.id)
        log.info("sandbox.container_created", extra={"fields": {"id": spec.id, "network": spec.network, "ip": ip}})
        return ContainerState(id=spec.id, status="created", ip=ip, labels=dict(spec.labels))

    def _write_bundle(self, spec: ContainerSpec) -> None:
        """config.json and the /etc files, all derived from spec.json: `start` rebuilds a
        bundle that a crash left torn."""
        user = self._resolve_user(spec)  # two small files: cheaper inline than a thread hop
        attachment = self.network.attachment(spec.id) if spec.network == "bridge" else None
        config = build_config(
            spec,
            user=user,
            cgroups=self.cgroups,
            cgroups_path=f"{self._cgroup_parent}/{spec.id}",
            netns_path=attachment.netns_path if attachment else None,
            etc_files=self._write_etc(spec, attachment.ip if attachment else None),
            nofile_limit=self._nofile_limit(),
            rootless=self.rootless,
        )
        bundle = self._dir(spec.id) / "bundle"
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_bytes(msgspec.json.encode(config))

    def _bundle_intact(self, container_id: str) -> bool:
        try:
            json.loads((self._dir(container_id) / "bundle" / "config.json").read_bytes())
            return True
        except (OSError, ValueError):
            return False

    @staticmethod
    def _nofile_limit() -> int:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        return NOFILE_LIMIT if hard == resource.RLIM_INFINITY else min(NOFILE_LIMIT, hard)

    def _resolve_user(self, spec: ContainerSpec) -> ResolvedUser:
        return resolve_user(spec.user, _read_inside(spec.rootfs, "etc/passwd"), _read_inside(spec.rootfs, "etc/group"))

    def _write_etc(self, spec: ContainerSpec, ip: str | None) -> dict[str, str]:
        etc = self._dir(spec.id) / "etc"
        etc.mkdir(exist_ok=True)
        hostname = spec.hostname or spec.id[:63]
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        if ip:
            hosts += f"{ip}\t{hostname}\n"
        (etc / "hosts").write_text(hosts)
        (etc / "hostname").write_text(hostname + "\n")
        try:
            resolv = Path("/etc/resolv.conf").read_text()
        except OSError:
            resolv = ""
        if spec.network != "host":
            # A nameserver on the host's loopback is unreachable from the container's namespace.
            resolv = "".join(
                line + "\n"
                for line in resolv.splitlines()
                if not (line.startswith("nameserver") and (" 127." in line or " ::1" in line))
            )
        (etc / "resolv.conf").write_text(resolv)
        return {f"/etc/{name}": str(etc / name) for name in ("hosts", "hostname", "resolv.conf")}

    async def start(self, container_id: str) -> ContainerState:
        async with self._lock(container_id):
            spec = self._load_spec(container_id)
            cdir = self._dir(container_id)
            if (cdir / "init.pid").exists() and self._exit_record(container_id) is None:
                if self._shim_alive(container_id):
                    raise ContainerStateError(f"container {container_id!r} is running", id=container_id)
            # A previous run (exited, or left over by a crash) must leave runc's books first.
            if (self.root / container_id).exists():
                await self._runc("delete", "--force", container_id, check=False)
            for name in ("exit.json", "init.pid", "shim.pid", "started.json"):
                (cdir / name).unlink(missing_ok=True)
            if spec.network == "bridge":
                await self.network.ensure_attached(container_id, spec.ports)
            if not self._bundle_intact(container_id):
                self._write_bundle(spec)
            args = [
                "--runc", self.runc,
                "--root", str(self.root),
                "--bundle", str(cdir / "bundle"),
                "--id", container_id,
                "--log-dir", str(cdir / "logs"),
                "--max-bytes", str(self.log_max_bytes),
                "--keep", str(self.log_keep),
                "--exit-file", str(cdir / "exit.json"),
                "--pid-file", str(cdir / "init.pid"),
                "--shim-log", str(cdir / "shim.log"),
                "--shim-pid-file", str(cdir / "shim.pid"),
            ]  # fmt: skip
            try:
                report = await self._run_shim(container_id, args)
            except BaseException:
                # The shim removed any half-made runc container; be "created" again, not "exited".
                for name in ("init.pid", "shim.pid"):
                    (cdir / name).unlink(missing_ok=True)
                raise
            pid = int(report.split()[1])
            started_at = time.time()
            # Informational only (not fsynced): a crash loses the process with it.
            (cdir / "started.json").write_text(json.dumps({"started_at": started_at}))
        attachment = self.network.attachment(container_id)
        log.info("sandbox.container_started", extra={"fields": {"id": container_id, "pid": pid}})
        return ContainerState(
            id=container_id,
            status="running",
            pid=pid,
            started_at=started_at,
            ip=attachment.ip if attachment else None,
            labels=dict(spec.labels),
        )

    async def _spawn_shim(self) -> trio.Process:
        return await trio.lowlevel.open_process(
            [*self.shim_argv, "shim", "--args-from-stdin"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    async def _run_shim(self, container_id: str, args: list[str]) -> str:
        """Hand `args` to a pre-started shim, return its `ok <pid>` report."""
        proc = self._warm_shim
        self._warm_shim = None
        if proc is None or proc.returncode is not None:
            proc = await self._spawn_shim()
        out = b""
        with trio.move_on_after(self.timeout) as scope:
            assert proc.stdin is not None and proc.stdout is not None
            await proc.stdin.send_all(("\0".join(args) + "\n").encode())
            await proc.stdin.aclose()
            while chunk := await proc.stdout.receive_some(65536):
                out += chunk
            await proc.wait()
        if scope.cancelled_caught:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
            raise RuncFailed(f"container {container_id}: shim did not report within {self.timeout}s", id=container_id)
        await proc.stdout.aclose()
        if self._warm_shim is None:
            # The next start finds a shim whose interpreter is already up. Spawned only
            # now, so its start-up does not compete with this container's runc create.
            self._warm_shim = await self._spawn_shim()
        report = out.decode(errors="replace").strip()
        if proc.returncode != 0 or not report.startswith("ok "):
            raise RuncFailed(f"container {container_id}: {report or 'shim failed silently'}", id=container_id)
        return report

    async def aclose(self) -> None:
        """Release the pre-started shim (it would exit by itself when this process does)."""
        proc, self._warm_shim = self._warm_shim, None
        if proc is not None:
            assert proc.stdin is not None
            with trio.CancelScope(shield=True):
                await proc.stdin.aclose()  # EOF: the idle shim exits 0
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    async def state(self, container_id: str) -> ContainerState:
        spec = self._load_spec(container_id)
        attachment = self.network.attachment(container_id)
        common = dict(
            id=container_id,
            ip=attachment.ip if attachment else None,
            labels=dict(spec.labels),
            pid=self._read_int(container_id, "init.pid"),
            started_at=self._started_at(container_id),
        )
        record = self._exit_record(container_id)
        if record is not None:
            return ContainerState(
                status="exited",
                exit_code=record["exit_code"],
                oom_killed=record["oom_killed"],
                finished_at=record["finished_at"],
                **common,
            )
        if common["pid"] is None:
            return ContainerState(status="created", **common)
        if self._shim_alive(container_id):
            return ContainerState(status="running", **common)
        # Shim gone without a verdict (killed, or the machine rebooted): ask runc.
        st = await self._runc_state(container_id)
        if st is not None and st.get("status") in ("running", "paused"):
            return ContainerState(status="running", **common)
        return ContainerState(status="exited", exit_code=None, **common)

    async def list(self) -> list[ContainerState]:
        out = []
        for name in sorted(os.listdir(self.containers_dir)):
            try:
                out.append(await self.state(name))
            except ContainerNotFound:
                continue  # a half-created directory without spec.json
        return out

    def orphans(self) -> list[str]:
        """Container directories without a readable spec (a crash mid-create)."""
        return [
            name
            for name in sorted(os.listdir(self.containers_dir))
            if name not in self._creating and not (self.containers_dir / name / "spec.json").exists()
        ]

    async def sweep(self) -> list[str]:
        removed = set()
        for name in self.orphans():
            await self._remove_everything(name)
            removed.add(name)
        known = {name for name in os.listdir(self.containers_dir)}
        for name in os.listdir(self.root):
            if name not in known and (self.root / name / "state.json").exists():
                await self._runc("delete", "--force", name, check=False)
                removed.add(name)
        removed.update(await self.network.sweep(keep=known))
        if not known:
            self._remove_cgroup_parent()
        if removed:
            log.info("sandbox.swept", extra={"fields": {"ids": sorted(removed)}})
        return sorted(removed)

    def _remove_cgroup_parent(self) -> None:
        """rmdir our (empty) parent cgroup in every hierarchy; runc delete removes only the leaves."""
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            _, controllers, own = line.split(":", 2)
            roots = (
                ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                if not controllers
                else ["/sys/fs/cgroup/" + controllers.replace("name=", "")]
            )
            for root in roots:
                try:
                    os.rmdir(f"{root}{own.rstrip('/')}/{self._cgroup_parent}")
                except OSError:
                    pass  # absent, not empty, or not a cgroup root

    async def inspect(self, container_id: str) -> ContainerSpec:
        return self._load_spec(container_id)

    async def wait(self, container_id: str) -> ContainerState:
        self._load_spec(container_id)
        while True:
            if self._exit_record(container_id) is not None:
                return await self.state(container_id)
            if self._read_int(container_id, "init.pid") is None:
                raise ContainerStateError(f"container {container_id!r} was never started", id=container_id)
            if not self._shim_alive(container_id):
                st = await self.state(container_id)
                if st.status == "exited":
                    return st
                await trio.sleep(0.5)  # running without a shim: poll runc less often
                continue
            await trio.sleep(WAIT_POLL)

    async def kill(self, container_id: str, signal: int) -> None:
        self._load_spec(container_id)
        proc = await self._runc("kill", container_id, str(int(signal)), check=False)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            if "not running" in err or "does not exist" in err or "process already finished" in err:
                raise ContainerStateError(f"container {container_id!r} is not running", id=container_id)
            raise RuncFailed(f"runc kill failed: {err}", id=container_id)

    async def stop(self, container_id: str, grace: float = 10.0) -> ContainerState:
        spec = self._load_spec(container_id)
        st = await self.state(container_id)
        if st.status != "running":
            return st
        try:
            await self.kill(container_id, spec.stop_signal)
        except ContainerStateError:
            pass
        with trio.move_on_after(grace):
            return await self.wait(container_id)
        try:
            await self.kill(container_id, signals.SIGKILL)
        except ContainerStateError:
            pass
        with trio.move_on_after(self.timeout):
            return await self.wait(container_id)
        raise SandboxError(f"container {container_id!r} did not die after SIGKILL", id=container_id)

    async def delete(self, container_id: str) -> None:
        self._load_spec(container_id)
        async with self._lock(container_id):
            st = await self.state(container_id)
            if st.status == "running":
                try:
                    await self.kill(container_id, signals.SIGKILL)
                except ContainerStateError:
                    pass
                with trio.move_on_after(self.timeout):
                    await self.wait(container_id)
            await self._remove_everything(container_id)
        self._locks.pop(container_id, None)
        log.info("sandbox.container_deleted", extra={"fields": {"id": container_id}})

    async def _remove_everything(self, container_id: str) -> None:
        if (self.root / container_id).exists():
            await self._runc("delete", "--force", container_id, check=False)
        await self.network.detach(container_id)
        await trio.to_thread.run_sync(shutil.rmtree, self._dir(container_id), True)

    # ------------------------------------------------------------ exec, stats, logs

    async def exec(self, container_id: str, args: list[str], timeout: float = 30.0) -> ExecResult:
        if not args:
            raise ContainerStateError("exec needs a command", id=container_id)
        st = await self.state(container_id)
        if st.status != "running":
            raise ContainerStateError(f"container {container_id!r} is not running", id=container_id)
        pid_file = self._dir(container_id) / f"exec-{os.getpid()}-{time.monotonic_ns()}.pid"
        argv = [self.runc, *self._runc_flags, "exec", "--pid-file", str(pid_file), container_id, *args]
        try:
            with trio.move_on_after(timeout) as scope:
                proc = await trio.run_process(argv, stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
            if scope.cancelled_caught:
                # The exec'd process outlives a killed `runc exec`; kill it by pid.
                pid = None
                try:
                    pid = int(pid_file.read_text().strip())
                    os.kill(pid, signals.SIGKILL)
                except (OSError, ValueError):
                    pass
                raise ExecTimeout(f"exec in {container_id} exceeded {timeout}s", id=container_id, pid=pid)
        finally:
            pid_file.unlink(missing_ok=True)
        return ExecResult(exit_code=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)

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
    ) -> AsyncIterator[RuncExecSession]:
        if not args:
            raise ContainerStateError("exec needs a command", id=container_id)
        st = await self.state(container_id)
        if st.status != "running":
            raise ContainerStateError(f"container {container_id!r} is not running", id=container_id)
        runc = [self.runc, *self._runc_flags]
        async with open_runc_exec(
            runc, self._dir(container_id), container_id, args, tty=tty, stdin=stdin, rows=rows, cols=cols
        ) as session:
            yield session

    async def stats(self, container_id: str) -> ContainerStats:
        st = await self.state(container_id)
        if st.status != "running":
            raise ContainerStateError(f"container {container_id!r} is not running", id=container_id)
        proc = await self._runc("events", "--stats", container_id)
        data = json.loads(proc.stdout)["data"]
        memory = data.get("memory", {}).get("usage", {})
        limit = memory.get("limit")
        return ContainerStats(
            cpu_usage_ns=int(data.get("cpu", {}).get("usage", {}).get("total", 0)),
            memory_bytes=int(memory.get("usage", 0)),
            # An unlimited cgroup reports a huge sentinel (v1: PAGE_COUNTER_MAX pages).
            memory_limit_bytes=int(limit) if limit and int(limit) < (1 << 62) else None,
            pids=int(data.get("pids", {}).get("current", 0)),
        )

    def cgroup_dir(self, container_id: str, controller: str) -> Path | None:
        """Host path of a running container's cgroup for `controller` (v1) or the unified one."""
        pid = self._read_int(container_id, "init.pid")
        if pid is None:
            return None
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return Path(f"/sys/fs/cgroup/{controllers}{path}")
        for line in lines:
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup" + line[3:])
        return None

    def log_dir(self, container_id: str) -> Path:
        return self._dir(container_id) / "logs"

    async def read_logs(self, container_id: str, since_offset: int = 0, tail: int | None = None) -> list[LogRecord]:
        self._load_spec(container_id)
        return await trio.to_thread.run_sync(container_logs.read, str(self.log_dir(container_id)), since_offset, tail)

    async def read_logs_from_end(self, container_id: str, tail: int) -> tuple[list[LogRecord], int]:
        self._load_spec(container_id)
        return await trio.to_thread.run_sync(container_logs.read_tail, str(self.log_dir(container_id)), tail)

    def follow_logs(self, container_id: str, since_offset: int = 0) -> AsyncIterator[LogRecord]:
        self._load_spec(container_id)
        return container_logs.follow(str(self.log_dir(container_id)), since_offset)
