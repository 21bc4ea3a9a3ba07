"""RuncRuntime and Supervisor against real runc, as root, on a busybox root filesystem.

The root filesystem is built here from Debian's static busybox (no image
tooling involved). Networking uses its own bridge/subnet/tag so it cannot
collide with a node's `cl0`; every test deletes its containers even on
failure, and the module checks nothing is left behind.
"""

import math
import os
import random
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from cloudless.sandbox.network import BridgeConfig, BridgeNetwork
from cloudless.sandbox.runc import RuncRuntime
from cloudless.sandbox.runtime import ContainerSpec, HealthCheck, PortMapping, RestartPolicy
from cloudless.sandbox.spec import CAPABILITIES
from cloudless.sandbox.supervisor import Adopted, Exited, GaveUp, Started, Supervisor, Unhealthy

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        shutil.which("runc") is None or not os.path.exists("/usr/bin/busybox"), reason="needs runc and busybox-static"
    ),
]

BRIDGE = BridgeConfig(bridge="cltest0", subnet="10.88.251.0/24", tag="cltest", veth_prefix="clt")

# capability numbers from linux/capability.h
CAP_NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13, "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21, "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}  # fmt: skip


def build_busybox_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)  # as in real images; runc gives a tmpfs the mode of the directory it covers
    (root / "www").mkdir()
    shutil.copy("/usr/bin/busybox", root / "bin" / "busybox")
    applets = subprocess.run(["/usr/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for name in ("hosts", "hostname", "resolv.conf"):  # bind-mount targets, present so runc never writes here
        (root / "etc" / name).write_text("")
    (root / "www" / "index.html").write_text("hello from the container\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def remove_test_bridge_afterwards(tmp_path_factory):
    yield
    net = BridgeNetwork(tmp_path_factory.mktemp("bridge-teardown"), BRIDGE)
    trio.run(net.remove_bridge)
    assert not os.path.exists(f"/sys/class/net/{BRIDGE.bridge}")


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    return str(build_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs"))


@pytest.fixture
async def runtime(tmp_path):
    rt = RuncRuntime(tmp_path / "state", bridge=BRIDGE, command_timeout=20)
    try:
        yield rt
    finally:
        with trio.CancelScope(shield=True):
            for st in await rt.list():
                await rt.delete(st.id)
            await rt.sweep()
            await rt.aclose()


def spec(rootfs, cid, args, **kw):
    kw.setdefault("network", "none")
    return ContainerSpec(id=cid, rootfs=rootfs, args=args, **kw)


async def run_to_exit(rt, s, timeout=20):
    await rt.create(s)
    await rt.start(s.id)
    with trio.fail_after(timeout):
        return await rt.wait(s.id)


async def runc_list(root) -> str:
    """`runc list -q` under `root`: the container ids runc still knows."""
    done = await trio.run_process(["runc", "--root", str(root), "list", "-q"], capture_stdout=True)
    return done.stdout.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(tag: str) -> list[str]:
    found = []
    if os.path.isdir("/run/netns"):
        found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(tag + "-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [
        f"link {line.split(':')[1].strip()}"
        for line in links.splitlines()
        if f": {BRIDGE.veth_prefix}" in line and f": {BRIDGE.bridge}:" not in line
    ]
    for table in ("nat", "filter"):
        rules = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True).stdout
        found += [f"rule {r}" for r in rules.splitlines() if f"{tag}:" in r]
    return found


# ---------------------------------------------------------------- process, logs, exit codes


async def test_stdout_stderr_are_logged_with_timestamps_and_exit_code_is_kept(runtime, rootfs):
    final = await run_to_exit(
        runtime, spec(rootfs, "echo", ["sh", "-c", "echo out one; echo err one >&2; echo out two; exit 3"])
    )
    assert final.status == "exited" and final.exit_code == 3 and not final.oom_killed
    records = await runtime.read_logs("echo")
    by_stream = {s: [r.text for r in records if r.stream == s] for s in ("stdout", "stderr")}
    assert by_stream == {"stdout": ["out one", "out two"], "stderr": ["err one"]}
    assert all(abs(r.ts - final.finished_at) < 10 for r in records)
    assert [r.text for r in await runtime.read_logs("echo", tail=1)] in (["out two"], ["err one"])


async def test_signal_exit_is_128_plus_signal_and_stop_escalates_to_sigkill(runtime, rootfs):
    await runtime.create(spec(rootfs, "polite", ["sleep", "1000"]))
    await runtime.start("polite")
    # sleep as pid 1 has no SIGTERM handler, and the kernel ignores default-action signals to a pidns init
    # unless it installed a handler, so `stop` has to escalate: exit 137.
    with trio.fail_after(15):
        final = await runtime.stop("polite", grace=0.5)
    assert final.exit_code == 137
    await runtime.create(spec(rootfs, "trapper", ["sh", "-c", "trap 'exit 143' TERM; while true; do sleep 0.1; done"]))
    await runtime.start("trapper")
    await trio.sleep(0.3)
    with trio.fail_after(15):
        final = await runtime.stop("trapper", grace=10)
    assert final.exit_code == 143


async def test_restart_of_same_container_appends_logs(runtime, rootfs):
    s = spec(rootfs, "again", ["sh", "-c", "echo run"])
    await run_to_exit(runtime, s)
    await runtime.start("again")
    with trio.fail_after(20):
        assert (await runtime.wait("again")).exit_code == 0
    assert [r.text for r in await runtime.read_logs("again")] == ["run", "run"]


# ---------------------------------------------------------------- limits and hardening


async def test_memory_hog_is_oom_killed_and_reported(runtime, rootfs):
    hog = spec(rootfs, "hog", ["sh", "-c", "x=aaaaaaaa; while true; do x=$x$x; done"], memory_bytes=32 << 20)
    final = await run_to_exit(runtime, hog, timeout=30)
    assert final.oom_killed, final
    assert final.exit_code == 137


async def test_cpu_quota_and_pids_limit_are_visible_in_the_containers_cgroup(runtime, rootfs):
    await runtime.create(spec(rootfs, "quota", ["sleep", "1000"], cpu=0.5, pids_limit=64, memory_bytes=64 << 20))
    await runtime.start("quota")
    if runtime.cgroups.version == 1:
        r = await runtime.exec(
            "quota", ["cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"]
        )
        assert r.stdout.split() == [b"50000", b"100000"]
        host = runtime.cgroup_dir("quota", "pids")
        assert (host / "pids.max").read_text().strip() == "64"
        mem = runtime.cgroup_dir("quota", "memory")
        assert int((mem / "memory.limit_in_bytes").read_text()) == 64 << 20
    else:
        r = await runtime.exec("quota", ["cat", "/sys/fs/cgroup/cpu.max"])
        assert r.stdout.split() == [b"50000", b"100000"]
    stats = await runtime.stats("quota")
    assert stats.pids >= 1 and stats.memory_bytes > 0 and stats.memory_limit_bytes == 64 << 20


async def test_capabilities_are_dropped_and_seccomp_and_no_new_privs_apply(runtime, rootfs):
    final = await run_to_exit(
        runtime, spec(rootfs, "caps", ["grep", "-E", "^(Cap|Seccomp|NoNewPrivs)", "/proc/self/status"])
    )
    assert final.exit_code == 0
    fields = dict(line.text.split(":\t") for line in await runtime.read_logs("caps"))
    expected = sum(1 << CAP_NUMBERS[c] for c in CAPABILITIES)
    assert int(fields["CapEff"], 16) == expected
    assert int(fields["CapBnd"], 16) == expected
    assert int(fields["CapEff"], 16) & (1 << CAP_NUMBERS["CAP_SYS_ADMIN"]) == 0
    assert fields["CapAmb"] == fields["CapInh"] == "0000000000000000"
    assert fields["Seccomp"] == "2" and fields["NoNewPrivs"] == "1"


async def test_seccomp_refuses_unshare_even_where_capabilities_would_not(runtime, rootfs):
    # `unshare -U` (a user namespace) needs no capability; only the seccomp profile stops it.
    final = await run_to_exit(runtime, spec(rootfs, "userns", ["unshare", "-U", "true"]))
    assert final.exit_code != 0
    assert any("Operation not permitted" in r.text for r in await runtime.read_logs("userns"))


async def test_readonly_root_refuses_writes_but_tmp_is_writable(runtime, rootfs):
    script = "touch /newfile && echo root-writable; touch /tmp/x && echo tmp-ok; id -u"
    final = await run_to_exit(runtime, spec(rootfs, "ro", ["sh", "-c", script], readonly_rootfs=True, user="nobody"))
    texts = [r.text for r in await runtime.read_logs("ro")]
    assert "root-writable" not in texts and "tmp-ok" in texts and "65534" in texts
    assert any("Read-only file system" in t or "Permission denied" in t for t in texts)
    assert final.exit_code == 0
    assert not await trio.Path(rootfs, "newfile").exists()


async def test_exec_returns_exit_code_and_output(runtime, rootfs):
    await runtime.create(spec(rootfs, "ex", ["sleep", "1000"], env={"GREETING": "hi"}))
    await runtime.start("ex")
    r = await runtime.exec("ex", ["sh", "-c", "echo $GREETING; echo e >&2; exit 4"])
    assert (r.exit_code, r.stdout, r.stderr) == (4, b"hi\n", b"e\n")


async def test_exec_session_streams_output_before_the_command_ends_and_returns_its_code(runtime, rootfs):
    await runtime.create(spec(rootfs, "exs", ["sleep", "1000"]))
    await runtime.start("exs")
    script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo late >&2; exit 7"
    async with runtime.exec_session("exs", ["sh", "-c", script]) as session:
        with trio.fail_after(20):
            assert await session.read_output() == ("stdout", b"first\n")  # while the command still waits
        r = await runtime.exec("exs", ["touch", "/tmp/go"])
        assert r.exit_code == 0
        rest = []
        while (out := await session.read_output()) is not None:
            rest.append(out)
        assert rest == [("stderr", b"late\n")]
        assert await session.wait() == 7


async def test_exec_session_stdin_reaches_the_command_and_its_close_is_eof(runtime, rootfs):
    await runtime.create(spec(rootfs, "exi", ["sleep", "1000"]))
    await runtime.start("exi")
    async with runtime.exec_session("exi", ["sh", "-c", "tr a-z A-Z; echo done"], stdin=True) as session:
        await session.write_stdin(b"hello\n")
        with trio.fail_after(20):
            assert await session.read_output() == ("stdout", b"HELLO\n")
        await session.close_stdin()
        out = b""
        while (piece := await session.read_output()) is not None:
            out += piece[1]
        assert out == b"done\n"
        assert await session.wait() == 0


async def test_exec_session_with_a_tty_gives_the_command_a_terminal_its_size_and_sigint(runtime, rootfs):
    await runtime.create(spec(rootfs, "ext", ["sleep", "1000"]))
    await runtime.start("ext")

    seen = bytearray()  # everything the terminal showed so far

    async def read_until(session, needle: bytes) -> bytes:
        with trio.move_on_after(20):
            while needle not in seen:
                piece = await session.read_output()
                assert piece is not None, f"output ended before {needle!r}: {bytes(seen)!r}"
                assert piece[0] == "stdout"  # one terminal: stdout and stderr are one stream
                seen.extend(piece[1])
        assert needle in seen, f"no {needle!r} in {bytes(seen)!r}"
        return bytes(seen)

    async def poke_until(session, needle: bytes) -> None:
        # Sizes reach the container's terminal asynchronously (runc copies them on SIGWINCH):
        # ask again, with an empty line, until the new size shows.
        with trio.move_on_after(20):
            while needle not in seen:
                await session.write_stdin(b"\r")
                with trio.move_on_after(0.5):
                    while needle not in seen:
                        piece = await session.read_output()
                        assert piece is not None, f"output ended before {needle!r}: {bytes(seen)!r}"
                        seen.extend(piece[1])
        assert needle in seen, f"no {needle!r} in {bytes(seen)!r}"

    script = (
        'tty; read line; echo got:$line; while read line && [ "$line" != stop ]; do stty size; done;'
        " trap 'echo interrupted; exit 3' INT; echo armed; sleep 100 & wait"
    )
    async with runtime.exec_session("ext", ["sh", "-c", script], tty=True, stdin=True, rows=33, cols=101) as session:
        await read_until(session, b"/dev/pts/")
        await session.write_stdin(b"abc\r")  # a terminal turns CR into NL (icrnl)
        await read_until(session, b"got:abc")
        await poke_until(session, b"33 101")
        session.resize(50, 120)  # a window resized while the command runs
        await poke_until(session, b"50 120")
        await session.write_stdin(b"stop\r")
        await read_until(session, b"armed")
        await session.write_stdin(b"\x03")  # ^C: the line discipline sends SIGINT to the foreground group
        await read_until(session, b"interrupted")
        with trio.fail_after(20):
            assert await session.wait() == 3


async def test_exec_session_left_early_kills_the_command(runtime, rootfs):
    await runtime.create(spec(rootfs, "exk", ["sleep", "1000"]))
    await runtime.start("exk")
    async with runtime.exec_session("exk", ["sh", "-c", "echo up; exec sleep 301"]) as session:
        with trio.fail_after(20):
            assert await session.read_output() == ("stdout", b"up\n")
    with trio.fail_after(10):
        while True:  # the exec'd process dies with the session, not only runc
            if b"sleep 301" not in (await runtime.exec("exk", ["ps", "-o", "args"])).stdout:
                break
            await trio.sleep(0.1)


# ---------------------------------------------------------------- networking


async def test_published_port_reachable_on_localhost_bridge_peers_talk_and_delete_leaves_nothing(runtime, rootfs):
    port = free_port()
    web = spec(
        rootfs, "web", ["httpd", "-f", "-p", "80", "-h", "/www"], network="bridge", ports=[PortMapping(port, 80)]
    )
    await runtime.create(web)
    web_state = await runtime.start("web")
    assert web_state.ip and web_state.ip.startswith("10.88.251.")

    async def fetch_via_localhost():
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
            return data

    body = b""
    with trio.fail_after(10):
        while b"hello from the container" not in body:
            try:
                body = await fetch_via_localhost()
            except OSError:
                await trio.sleep(0.1)
    assert body.startswith(b"HTTP/1.")

    client = spec(rootfs, "client", ["wget", "-q", "-O", "-", f"http://{web_state.ip}/index.html"], network="bridge")
    final = await run_to_exit(runtime, client)
    assert final.exit_code == 0
    assert [r.text for r in await runtime.read_logs("client")] == ["hello from the container"]
    assert any("cltest:web" in x for x in leftovers("cltest"))  # the rules exist while it runs

    await runtime.delete("web")
    await runtime.delete("client")
    assert leftovers("cltest") == []
    assert runtime.network.attachments() == {}


async def test_sweep_removes_network_leftovers_of_unknown_containers(runtime, rootfs):
    await runtime.network.attach("ghost", [PortMapping(free_port(), 80)])  # as if a crash lost the container
    assert leftovers("cltest")
    removed = await runtime.sweep()
    assert "ghost" in removed
    assert leftovers("cltest") == []


# ---------------------------------------------------------------- supervision


async def _events_until(recv, predicate, timeout=30):
    seen = []
    with trio.fail_after(timeout):
        while True:
            ev = await recv.receive()
            seen.append(ev)
            if predicate(ev):
                return seen


async def test_on_failure_restarts_up_to_max_with_real_runc(runtime, rootfs):
    send, recv = trio.open_memory_channel(math.inf)
    sup = Supervisor(runtime, rng=random.Random(5), events=send)
    policy = RestartPolicy(mode="on-failure", max_retries=2, backoff_initial=0.05, backoff_max=0.1)
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        await sup.ensure(spec(rootfs, "flaky", ["sh", "-c", "echo attempt; exit 1"], restart=policy))
        events = await _events_until(recv, lambda e: isinstance(e, GaveUp))
        n.cancel_scope.cancel()
    assert [e.exit_code for e in events if isinstance(e, Exited)] == [1, 1, 1]
    assert len([e for e in events if isinstance(e, Started)]) == 3
    assert [r.text for r in await runtime.read_logs("flaky")] == ["attempt"] * 3


async def test_failing_exec_health_check_restarts_container(runtime, rootfs):
    send, recv = trio.open_memory_channel(math.inf)
    sup = Supervisor(runtime, rng=random.Random(5), events=send, stop_grace=1.0)
    check = HealthCheck(kind="exec", command=["test", "-f", "/tmp/healthy"], interval=0.3, timeout=2.0, retries=2)
    script = "touch /tmp/healthy; sleep 1; rm /tmp/healthy; exec sleep 1000"
    policy = RestartPolicy(mode="always", backoff_initial=0.05, backoff_max=0.1)
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        await sup.ensure(spec(rootfs, "sick", ["sh", "-c", script], restart=policy, health=check, readonly_rootfs=True))
        events = await _events_until(recv, lambda e: isinstance(e, Started) and e.restart_count == 1)
        n.cancel_scope.cancel()
    kinds = [type(e) for e in events]
    assert Unhealthy in kinds and kinds.index(Unhealthy) < kinds.index(Exited)
    assert next(e for e in events if isinstance(e, Exited)).exit_code == 137  # sleep ignores TERM as pid 1


async def test_adoption_after_supervisor_restart_does_not_start_a_duplicate(runtime, rootfs, tmp_path):
    send, recv = trio.open_memory_channel(math.inf)
    first = Supervisor(runtime, rng=random.Random(1), events=send)
    async with trio.open_nursery() as n:
        await n.start(first.run)
        await first.ensure(
            spec(rootfs, "svc", ["sleep", "1000"], restart=RestartPolicy(mode="always"), network="bridge")
        )
        (started,) = [e for e in await _events_until(recv, lambda e: isinstance(e, Started))]
        n.cancel_scope.cancel()  # the node process goes away; the container does not

    # A new runtime object on the same state dir: what a restarted node builds.
    reborn = RuncRuntime(runtime.state_dir, bridge=BRIDGE, command_timeout=20)
    send2, recv2 = trio.open_memory_channel(math.inf)
    second = Supervisor(reborn, rng=random.Random(2), events=send2)
    async with trio.open_nursery() as n:
        adopted = await n.start(second.run)
        await trio.sleep(0.5)
        n.cancel_scope.cancel()
    assert adopted == ["svc"]
    state = await reborn.state("svc")
    assert state.status == "running" and state.pid == started.pid
    events = []
    while True:
        try:
            events.append(recv2.receive_nowait())
        except trio.WouldBlock:
            break
    assert [type(e) for e in events] == [Adopted]
    # adoption's sweep kept the adopted container's network
    assert state.ip and await trio.Path(reborn.network.attachment("svc").netns_path).exists()
    r = await reborn.exec("svc", ["ip", "-o", "-4", "addr", "show", "eth0"])
    assert state.ip in r.stdout.decode()
    await reborn.aclose()
    listed = (await runc_list(reborn.root)).split()
    assert listed == ["svc"]


# ---------------------------------------------------------------- more logs, health, errors


async def test_follow_streams_lines_as_written_across_rotations(tmp_path, rootfs):
    rt = RuncRuntime(tmp_path / "small-logs", bridge=BRIDGE, command_timeout=20, log_max_bytes=1024, log_keep=2)
    try:
        script = "i=0; while [ $i -lt 60 ]; do echo line-$i; i=$((i+1)); usleep 20000; done"
        await rt.create(spec(rootfs, "chatty", ["sh", "-c", script]))
        await rt.start("chatty")
        seen = []
        with trio.fail_after(30):
            async for rec in rt.follow_logs("chatty"):
                seen.append(rec.text)
                if rec.text == "line-59":
                    break
        assert seen == [f"line-{i}" for i in range(60)]  # nothing lost although segments rotated away
        await rt.wait("chatty")
        kept = await rt.read_logs("chatty")
        assert kept[-1].text == "line-59" and len(kept) < 60  # only `keep` segments remain
        assert len(os.listdir(rt.log_dir("chatty"))) == 2
    finally:
        with trio.CancelScope(shield=True):
            for st in await rt.list():
                await rt.delete(st.id)
            await rt.sweep()
            await rt.aclose()


async def test_http_health_check_on_bridge_container_reports_healthy(runtime, rootfs):
    send, recv = trio.open_memory_channel(math.inf)
    sup = Supervisor(runtime, rng=random.Random(3), events=send)
    check = HealthCheck(kind="http", port=80, path="/index.html", interval=0.2, timeout=2, retries=2)
    web = spec(rootfs, "healthy-web", ["httpd", "-f", "-p", "80", "-h", "/www"], network="bridge", health=check,
               restart=RestartPolicy(mode="always"))  # fmt: skip
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        await sup.ensure(web)
        events = await _events_until(recv, lambda e: type(e).__name__ == "HealthChanged")
        n.cancel_scope.cancel()
    assert events[-1].status == "healthy"
    assert sup.status("healthy-web").health == "healthy"


async def test_exec_timeout_kills_the_exec_process(runtime, rootfs):
    from cloudless.sandbox.runtime import ExecTimeout

    await runtime.create(spec(rootfs, "slow", ["sleep", "1000"]))
    await runtime.start("slow")
    with pytest.raises(ExecTimeout):
        await runtime.exec("slow", ["sleep", "300"], timeout=0.5)
    with trio.fail_after(5):
        while True:
            ps = await runtime.exec("slow", ["ps", "-o", "args"])
            if b"sleep 300" not in ps.stdout:
                break
            await trio.sleep(0.1)


async def test_bad_spec_and_bad_rootfs_fail_clearly_and_leave_nothing(runtime, rootfs, tmp_path):
    from cloudless.sandbox.runtime import ContainerExists, InvalidContainerSpec, RuncFailed, SandboxError

    with pytest.raises(InvalidContainerSpec):
        await runtime.create(spec(rootfs, "x", ["sh"], memory_bytes=10))
    with pytest.raises(SandboxError):
        await runtime.create(spec(str(tmp_path / "missing"), "nofs", ["sh"], network="bridge"))
    assert await runtime.list() == [] and leftovers("cltest") == []
    await runtime.create(spec(rootfs, "noexe", ["/no/such/binary"]))
    with pytest.raises(ContainerExists):
        await runtime.create(spec(rootfs, "noexe", ["sh"]))
    with pytest.raises(RuncFailed) as e:
        await runtime.start("noexe")
    assert "no/such/binary" in e.value.message
    assert (await runc_list(runtime.root)).split() == []
    await runtime.delete("noexe")
    assert await runtime.list() == []


async def test_restart_after_reboot_replumbs_lost_network_with_same_address(runtime, rootfs):
    await runtime.create(spec(rootfs, "boot", ["sleep", "1000"], network="bridge"))
    first = await runtime.start("boot")
    await runtime.stop("boot", grace=0.2)
    # A reboot loses /run/netns, the veth and the rules; only our state dir survives.
    a = runtime.network.attachment("boot")
    await trio.run_process(["ip", "netns", "del", a.netns])
    assert not await trio.Path(a.netns_path).exists()
    again = await runtime.start("boot")
    assert again.ip == first.ip and again.status == "running"
    r = await runtime.exec("boot", ["ip", "-o", "-4", "addr", "show", "eth0"])
    assert first.ip in r.stdout.decode()


async def test_host_network_mode_shares_the_hosts_interfaces(runtime, rootfs):
    final = await run_to_exit(runtime, spec(rootfs, "hostnet", ["ls", "/sys/class/net"], network="host"))
    assert final.exit_code == 0
    inside = {r.text for r in await runtime.read_logs("hostnet")}
    assert inside == set(os.listdir("/sys/class/net"))
    assert runtime.network.attachment("hostnet") is None


async def test_publishing_a_host_port_twice_is_a_conflict(runtime, rootfs):
    from cloudless.sandbox.runtime import PortInUse

    port = free_port()
    await runtime.create(spec(rootfs, "first", ["sleep", "1"], network="bridge", ports=[PortMapping(port, 80)]))
    with pytest.raises(PortInUse) as e:
        await runtime.create(spec(rootfs, "second", ["sleep", "1"], network="bridge", ports=[PortMapping(port, 80)]))
    assert e.value.exit_code == 4
    assert [s.id for s in await runtime.list()] == ["first"]
    assert not any("cltest:second" in x for x in leftovers("cltest"))


NODE_SCRIPT = """
import sys, trio
from pathlib import Path
from cloudless.sandbox.network import BridgeConfig
from cloudless.sandbox.runc import RuncRuntime
from cloudless.sandbox.runtime import ContainerSpec

async def main(state_dir, rootfs):
    rt = RuncRuntime(Path(state_dir), bridge=BridgeConfig(bridge="cltest0", subnet="10.88.251.0/24", tag="cltest", veth_prefix="clt"))
    for cid, args in (("ticker", ["sh", "-c", "while true; do echo tick; sleep 0.1; done"]),
                      ("short", ["sh", "-c", "sleep 1; echo done; exit 7"])):
        await rt.create(ContainerSpec(id=cid, rootfs=rootfs, args=args, network="none"))
        await rt.start(cid)
    print("ready", flush=True)
    await trio.sleep_forever()

trio.run(main, sys.argv[1], sys.argv[2])
"""


async def test_containers_outlive_a_killed_node_process_and_keep_logging_and_their_exit_code(tmp_path, rootfs):
    """kill -9 of the node: the shims keep pumping logs and record exits; a new process adopts the results."""
    import signal
    import sys

    state_dir = tmp_path / "node-state"
    rt = RuncRuntime(state_dir, bridge=BRIDGE, command_timeout=20)  # the restarted node's view
    node = await trio.lowlevel.open_process(
        [sys.executable, "-c", NODE_SCRIPT, str(state_dir), rootfs], stdout=subprocess.PIPE, cwd=os.getcwd()
    )
    try:
        out = b""
        try:
            with trio.fail_after(20):
                while not out.endswith(b"\n"):
                    out += await node.stdout.receive_some(100)
            assert out == b"ready\n"
        finally:
            node.send_signal(signal.SIGKILL)
            await node.wait()
        before = len(await rt.read_logs("ticker"))
        with trio.fail_after(10):
            final = await rt.wait("short")  # exits while no node process exists
        assert final.exit_code == 7 and [r.text for r in await rt.read_logs("short")] == ["done"]
        assert len(await rt.read_logs("ticker")) > before + 5  # still captured with the node dead
        assert (await rt.state("ticker")).status == "running"
    finally:
        with trio.CancelScope(shield=True):
            for st in await rt.list():
                await rt.delete(st.id)
            await rt.sweep()
            await rt.aclose()


@pytest.mark.slow
async def test_soak_many_lifecycles_leak_nothing(runtime, rootfs):
    """CLOUDLESS_LONG=1: 100 bridged create/start/exec/stop/delete cycles, 5 at a time; no leaks."""
    fds_before = len(os.listdir("/proc/self/fd"))

    async def cycle(i):
        cid = f"soak-{i}"
        await runtime.create(
            spec(rootfs, cid, ["sleep", "1000"], network="bridge", ports=[PortMapping(free_port(), 80)])
        )
        await runtime.start(cid)
        assert (await runtime.exec(cid, ["true"])).exit_code == 0
        assert (await runtime.stop(cid, grace=0.1)).exit_code == 137
        await runtime.delete(cid)

    for batch in range(20):
        async with trio.open_nursery() as n:
            for j in range(5):
                n.start_soon(cycle, batch * 5 + j)
    assert await runtime.list() == []
    assert leftovers("cltest") == []
    assert runtime.network.attachments() == {}
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 4  # the pre-started shim's pipes
    assert await runc_list(runtime.root) == ""


async def test_concurrent_first_attachments_create_the_bridge_once(runtime, rootfs):
    await runtime.network.remove_bridge()
    fresh = RuncRuntime(runtime.state_dir, bridge=BRIDGE, command_timeout=20)  # knows no bridge yet
    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(fresh.create, spec(rootfs, f"race-{i}", ["true"], network="bridge"))
    ips = {(await fresh.state(f"race-{i}")).ip for i in range(4)}
    assert len(ips) == 4 and None not in ips
    for i in range(4):
        await fresh.delete(f"race-{i}")
    await fresh.aclose()


async def test_end_to_end_from_an_imported_oci_image(runtime, tmp_path):
    """The image side's store and root builder feed this runtime (skipped if they are absent)."""
    oci_build = pytest.importorskip("cloudless.sandbox.imagebuild")
    images = pytest.importorskip("cloudless.sandbox.images")
    rootfs_mod = pytest.importorskip("cloudless.sandbox.rootfs")

    layout = oci_build.build_busybox_image(tmp_path / "img", "layout")
    store = images.ImageStore(tmp_path / "images")
    await trio.to_thread.run_sync(store.import_path, layout)
    builder = rootfs_mod.RootfsBuilder(store)
    prepared = await builder.aprepare("e2e", "busybox")
    try:
        cfg = prepared.config
        env = dict(e.split("=", 1) for e in cfg.env)
        env["GREETING"] = "from an OCI image"
        s = ContainerSpec(
            id="e2e", rootfs=str(prepared.path), args=[*cfg.entrypoint, "sh", "-c", "echo $GREETING; cat /etc/hostname"],
            env=env, cwd=cfg.working_dir or "/", user=cfg.user or "0:0", readonly_rootfs=True, network="none",
        )  # fmt: skip
        final = await run_to_exit(runtime, s)
        assert final.exit_code == 0
        assert [r.text for r in await runtime.read_logs("e2e")] == ["from an OCI image", "e2e"]
    finally:
        with trio.CancelScope(shield=True):
            if "e2e" in [st.id for st in await runtime.list()]:
                await runtime.delete("e2e")
            await builder.arelease("e2e")


async def test_stop_sends_the_images_stop_signal_first(runtime, rootfs):
    script = "trap 'echo got-usr1; exit 0' USR1; while true; do sleep 0.1; done"
    await runtime.create(spec(rootfs, "usr1", ["sh", "-c", script], stop_signal=10))
    await runtime.start("usr1")
    await trio.sleep(0.3)
    with trio.fail_after(15):
        final = await runtime.stop("usr1", grace=10)
    assert final.exit_code == 0
    assert [r.text for r in await runtime.read_logs("usr1")] == ["got-usr1"]
