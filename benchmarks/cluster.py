"""Cluster benchmark: `cloudless node` processes as a user runs them, beside etcd and PySyncObj.

    .venv/bin/python benchmarks/cluster.py [--quick] [--seconds S] [--trials N] [--only PART ...]

Prints one JSON object on stdout (progress goes to stderr). Everything is
measured on this machine in the same run:

- vars put throughput and p50/p99 latency at 1 and 32 clients. Ours: a
  3-node `cloudless dev up` cluster on loopback (every node fsyncs its Raft
  log); each simulated client is one ClusterClient (its own mTLS connection)
  running as a trio task in this process, pointed at the leader, writing a
  100-character value under one of 10,000 keys and issuing its next write
  when the previous one is acknowledged. `ours_via_follower_*` is the same
  load sent to a follower, which forwards every write to the leader.
  etcd (Debian's /usr/bin/etcd, 3 members, default fsync) and PySyncObj
  (appendEntriesUseBatch=False; it keeps its log in memory and never fsyncs)
  run the same workload through benchmarks/raft.py's runners.
- leader kill -9 -> first acknowledged write (`failover_*_ms`): the client
  writes through the survivors (one warm connection to each, tried in turn
  with a short per-try timeout, as ClusterClient fails over across its
  endpoints), timed from the SIGKILL. The killed node is restarted with
  `dev up` and the next trial waits for 3 live voters. etcd gets the same
  measurement (`etcd_failover_*_ms`, Debian's default timeouts: 100 ms
  heartbeat, 1 s election).
- voter replacement (`voter_replace_s`): 4 nodes (3 voters + 1 standby), a
  non-leader voter is killed -9; the time until status shows 3 voters, none
  of them the dead node, and how long gossip took to declare it dead (the
  leader's `member.dead` event).
- idle RSS and CPU of each node of the 3-node cluster over an idle window,
  from /proc/<pid>/status VmRSS and /proc/<pid>/stat utime+stime.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

# benchmarks/raft.py owns the etcd and PySyncObj runners; reuse them as they are.
_spec = importlib.util.spec_from_file_location("benchmarks_raft", HERE.parent / "raft.py")
raft_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(raft_bench)

VALUE_CHARS = 100
KEYS = 10_000
FAILOVER_TRY_TIMEOUT = 0.3
# etcd holds a write to a follower during an election until the client gives
# up, so its per-try timeout is the granularity of its figure: keep it small.
ETCD_TRY_TIMEOUT = 0.1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def note(message: str) -> None:
    print(f"[cluster-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


percentile = raft_bench.percentile


def summary(latencies_s: list[float], seconds: float) -> dict:
    return raft_bench.summary(latencies_s, seconds)


# ---------------------------------------------------------------------------
# /proc sampling


def proc_cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of proc(5))


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class CpuWindow:
    """CPU seconds used by some processes between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.ticks: dict[str, int] = {}
        self.started = 0.0

    def start(self) -> None:
        self.ticks = {name: proc_cpu_ticks(pid) for name, pid in self.pids.items()}
        self.started = time.perf_counter()

    def stop(self) -> tuple[float, dict[str, float]]:
        elapsed = time.perf_counter() - self.started
        used = {name: (proc_cpu_ticks(pid) - self.ticks[name]) / CLK_TCK for name, pid in self.pids.items()}
        return elapsed, used


# ---------------------------------------------------------------------------
# a dev cluster driven through the CLI, as a user drives it


def pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


class DevCluster:
    def __init__(self, directory: Path, nodes: int, base_port: int) -> None:
        self.directory = directory
        self.nodes = nodes
        self.base_port = base_port
        self.context = None
        self.addresses: dict[str, str] = {}

    def _cli(self, *args: str, timeout: float = 180.0) -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "cloudless", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            said = (proc.stdout.strip() + " " + proc.stderr.strip()).strip()[-2000:]
            raise RuntimeError(f"cloudless {' '.join(args[:2])} exited {proc.returncode}: {said}")
        return json.loads(proc.stdout)

    def up(self, timeout: float = 180.0) -> dict:
        from cloudless.api import client_config

        started = time.perf_counter()
        result = self._cli(
            "dev",
            "up",
            "--nodes",
            str(self.nodes),
            "--dir",
            str(self.directory),
            "--base-port",
            str(self.base_port),
            "--json",
            timeout=timeout,
        )
        self.addresses = {n["name"]: n["address"] for n in result["nodes"]}
        self.context = client_config.load(Path(result["config"])).context()
        result["up_s"] = round(time.perf_counter() - started, 2)
        return result

    def down(self) -> None:
        try:
            self._cli("dev", "down", "--dir", str(self.directory), "--timeout", "5", "--json", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            note(f"dev down failed ({exc}); killing by pid")
        for name in self.addresses:  # whatever survived the graceful stop
            pid = self.pid(name)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every node (SIGKILL after `grace`), keeping the pid files:
        `dev up` then restarts them all. (`dev down` removes the pid files,
        and `dev up` after it restarts nothing: cli/dev.py tests
        `_pid_alive(pid or -1)`, and kill(-1, 0) succeeds.)"""
        pids = [p for p in (self.pid(n) for n in self.addresses) if p]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for pid in pids:
            while time.monotonic() < deadline and pid_running(pid):
                time.sleep(0.05)
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)

    def pid(self, name: str) -> int | None:
        try:
            return int((self.directory / name / "node.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self, name: str) -> None:
        os.kill(self.pid(name), signal.SIGKILL)

    def client(self, *names: str, timeout: float = 5.0):
        from cloudless.api.client import ClusterClient

        endpoints = [self.addresses[n] for n in (names or self.addresses)]
        return ClusterClient(dataclasses.replace(self.context, endpoints=endpoints), timeout=timeout)


def pick_base_port() -> int:
    # dev up walks up from the base to free ports; start somewhere other
    # engineers' dev clusters (default 7101) are unlikely to be.
    return random.Random().randrange(21000, 39000, 10)


async def status(cluster: DevCluster, *names: str, timeout: float = 2.0):
    from cloudless.api.messages import StatusReply, StatusRequest

    client = cluster.client(*names, timeout=timeout)
    try:
        return await client.call("status", StatusRequest(), response=StatusReply)
    finally:
        await client.aclose()


async def wait_healthy(cluster: DevCluster, voters: int, standby: int = 0, exclude: str = "", timeout: float = 60.0):
    """Until status shows a leader, `voters` live voters (none of them `exclude`)
    and `standby` live non-voters."""
    import trio

    from cloudless.errors import CloudlessError

    names = [n for n in cluster.addresses if n != exclude]
    last = None
    with trio.move_on_after(timeout):
        while True:
            try:
                reply = await status(cluster, *names)
            except CloudlessError as exc:
                last = exc
            else:
                last = reply
                alive = {m.name for m in reply.members if m.state == "alive"}
                live_voters = [v for v in reply.voters if v in alive and v != exclude]
                others = [m for m in reply.members if m.state == "alive" and m.role != "voter" and m.name != exclude]
                if (
                    reply.leader
                    and len(reply.voters) == voters
                    and len(live_voters) == voters
                    and len(others) >= standby
                ):
                    return reply
            await trio.sleep(0.2)
    raise RuntimeError(f"cluster not healthy ({voters} voters + {standby} standby) after {timeout}s: {last}")


# ---------------------------------------------------------------------------
# throughput


def value_for(rng: random.Random) -> str:
    return rng.randbytes(VALUE_CHARS // 2).hex()


async def load_ours(cluster: DevCluster, target: str, clients: int, seconds: float) -> dict:
    """`clients` ClusterClients, all talking to node `target`, writing back to back."""
    import trio

    from cloudless.api.messages import VarsPut, VarValue
    from cloudless.errors import CloudlessError

    pool = [cluster.client(target, timeout=5.0) for _ in range(clients)]
    latencies: list[float] = []
    errors = 0

    async def warm(client) -> None:  # TLS handshakes are not part of the figure
        await client.call("vars.put", VarsPut("warm", "x", client.client_id, client.next_seq()), response=VarValue)

    async with trio.open_nursery() as nursery:
        for client in pool:
            nursery.start_soon(warm, client)

    pids = {name: cluster.pid(name) for name in cluster.addresses}
    cpu = CpuWindow(pids)
    own_cpu = os.times()

    async def run(n: int, client) -> None:
        nonlocal errors
        rng = random.Random(n)
        end = time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            if start >= end:
                return
            request = VarsPut(f"k{rng.randrange(KEYS)}", value_for(rng), client.client_id, client.next_seq())
            try:
                await client.call("vars.put", request, response=VarValue)
            except CloudlessError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    cpu.start()
    async with trio.open_nursery() as nursery:
        for n, client in enumerate(pool):
            nursery.start_soon(run, n, client)
    elapsed, used = cpu.stop()
    after = os.times()
    for client in pool:
        await client.aclose()
    result = dict(summary(latencies, seconds), errors=errors)
    ops = max(1, len(latencies))
    result["cpu_pct"] = {name: round(100 * s / elapsed, 1) for name, s in used.items()}
    result["cpu_ms_per_op"] = {name: round(1000 * s / ops, 3) for name, s in used.items()}
    client_cpu = (after.user + after.system) - (own_cpu.user + own_cpu.system)
    result["cpu_pct"]["bench_clients"] = round(100 * client_cpu / elapsed, 1)
    return result


# ---------------------------------------------------------------------------
# failover


async def failover_trial(cluster: DevCluster, trial: int) -> dict:
    import trio

    from cloudless.api.messages import VarsPut, VarValue
    from cloudless.errors import CloudlessError

    before = await wait_healthy(cluster, voters=3)
    await trio.sleep(0.5)  # let heartbeats settle after the previous restart
    before = await wait_healthy(cluster, voters=3)
    leader = before.leader
    survivors = [n for n in cluster.addresses if n != leader]
    # One warm connection per survivor, tried in turn: ClusterClient's own
    # failover order, without timing TLS handshakes after the kill.
    clients = {n: cluster.client(n, timeout=FAILOVER_TRY_TIMEOUT) for n in survivors}
    client_id = f"bench-failover-{trial}-{random.Random().getrandbits(32):08x}"
    seq = 0
    for name, client in clients.items():
        seq += 1
        await client.call(
            "vars.put", VarsPut("failover", f"warm-{name}", client_id, seq), response=VarValue, timeout=5.0
        )
    seq += 1
    request = VarsPut("failover", f"after-kill-{trial}", client_id, seq)  # one logical write, retried
    tries = 0
    acked_by = None
    killed_wall = time.time()
    killed_at = time.perf_counter()
    cluster.kill(leader)
    done = None
    with trio.move_on_after(30):
        while done is None:
            for name, client in clients.items():
                tries += 1
                try:
                    await client.call("vars.put", request, response=VarValue)
                except CloudlessError:
                    continue
                done = time.perf_counter()
                acked_by = name
                break
            else:
                await trio.sleep(0.005)
    for client in clients.values():
        await client.aclose()
    after = None
    with trio.move_on_after(10):
        while after is None or after.leader in ("", leader):
            try:
                after = await status(cluster, *survivors)
            except CloudlessError:
                await trio.sleep(0.1)
    elected = leader_seen_at(cluster, survivors, leader, killed_wall)
    return {
        "killed": leader,
        "leader_known_ms": None if elected is None else round((elected - killed_wall) * 1000, 1),
        "term_before": before.term,
        "new_leader": after.leader if after else None,
        "term_after": after.term if after else None,
        "acked_by": acked_by,
        "tries": tries,
        "ms": None if done is None else round((done - killed_at) * 1000, 1),
    }


async def leader_events(
    cluster: DevCluster, names: list[str], since_wall: float, prefixes: tuple[str, ...]
) -> list[dict]:
    """Events recorded by the first of `names` that answers (put the leader
    first), from `since_wall` on, whose kind starts with one of `prefixes`."""
    from cloudless.api.messages import Event, EventsFollow
    from cloudless.errors import CloudlessError

    rows: list[dict] = []
    client = cluster.client(*names, timeout=5.0)
    try:
        async with client.stream("events", EventsFollow(False, 1000), item=Event, timeout=5.0) as items:
            async for event in items:
                if event.ts >= since_wall and event.kind.startswith(prefixes):
                    rows.append({"t_wall": event.ts, "kind": event.kind, "node": event.node, "message": event.message})
    except CloudlessError as exc:
        note(f"could not read events: {exc}")
    finally:
        await client.aclose()
    return rows


def leader_seen_at(cluster: DevCluster, names: list[str], old_leader: str, since_wall: float) -> float | None:
    """When a survivor first logged a new leader (its `raft.leader` log
    record, checked once per Raft tick), from the nodes' log files."""
    first = None
    for name in names:
        path = cluster.directory / name / "logs" / "node.log"
        try:
            lines = path.read_text().splitlines()[-2000:]
        except OSError:
            continue
        for line in lines:
            if '"raft.leader"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("ts", 0) > since_wall and record.get("leader") not in (None, old_leader):
                first = record["ts"] if first is None else min(first, record["ts"])
                break
    return first


def run_failover(cluster: DevCluster, trials: int) -> tuple[list[dict], list[dict]]:
    """Trials, and the full cluster restarts needed between them.

    After a trial the killed node is restarted with `dev up` and the next
    trial waits for 3 live voters. When that does not happen (autopilot
    counts each kill as flaps and, past `max_flaps`, excludes the node for
    FLAP_WINDOW_S, leaving the 3-node cluster with fewer voters; and `dev up`
    gives up when its seed node was removed from Raft meanwhile), what the
    cluster said and autopilot's decisions are recorded, and every node is
    restarted, which clears the in-memory flap history.
    """
    import trio

    rows, restarts = [], []
    started_wall = time.time()
    for trial in range(trials):
        row = trio.run(failover_trial, cluster, trial)
        note(
            f"failover trial {trial}: killed {row['killed']}, first write after {row['ms']} ms "
            f"({row['tries']} tries), new leader {row['new_leader']} known after {row['leader_known_ms']} ms"
        )
        rows.append(row)
        try:
            restart = cluster.up(timeout=30.0)  # restarts the killed node from its data dir
            note(f"restarted {row['killed']} in {restart['up_s']} s")
            trio.run(wait_healthy, cluster, 3, 0, "", 20.0)
            continue
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            problem = str(exc)[:600]
        try:
            reply = trio.run(status, cluster)
            seen = {"leader": reply.leader, "voters": reply.voters, "learners": reply.learners}
            names = [reply.leader] + [n for n in cluster.addresses if n != reply.leader]
            decisions = trio.run(leader_events, cluster, names, started_wall, ("autopilot.",))
        except Exception as exc:  # diagnosis only; the restart below is what matters
            seen, decisions = {"error": str(exc)}, []
        note(
            f"after trial {trial}: {problem}; status {seen}; autopilot "
            f"{[(e['kind'], e['node'], e['message']) for e in decisions]}"
        )
        restarts.append(
            {
                "after_trial": trial,
                "problem": problem,
                "status": seen,
                "autopilot": [{k: e[k] for k in ("kind", "node", "message")} for e in decisions][-8:],
            }
        )
        cluster.stop_all()
        cluster.up()
        trio.run(wait_healthy, cluster, 3, 0, "", 90.0)
        started_wall = time.time()
        note("every node restarted: 3 voters again")
    return rows, restarts


def etcd_failover(etcd, trials: int) -> list[dict]:
    """The same measurement on etcd (default timeouts: 100 ms heartbeat, 1 s
    election): kill -9 the leader, write through the survivors' gateways with
    ETCD_TRY_TIMEOUT per try, restart the member from its data dir."""
    import http.client

    rows = []
    body = json.dumps({"key": "ZmFpbG92ZXI=", "value": "eA=="})  # base64 of "failover", "x"
    for trial in range(trials):
        leader_port = etcd.leader_port()
        index = etcd.client_ports.index(leader_port)
        survivors = [p for p in etcd.client_ports if p != leader_port]
        conns = {p: http.client.HTTPConnection("127.0.0.1", p, timeout=ETCD_TRY_TIMEOUT) for p in survivors}

        def put(port: int) -> bool:
            try:
                conns[port].request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
                response = conns[port].getresponse()
                response.read()
                return response.status == 200
            except (OSError, http.client.HTTPException):
                conns[port].close()
                conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=ETCD_TRY_TIMEOUT)
                return False

        for port in survivors:  # warm connections
            for _ in range(20):
                if put(port):
                    break
                time.sleep(0.1)
        victim = etcd.procs[index]
        killed_at = time.perf_counter()
        victim.send_signal(signal.SIGKILL)
        done, tries = None, 0
        while done is None and time.perf_counter() - killed_at < 30:
            for port in survivors:
                tries += 1
                if put(port):
                    done = time.perf_counter()
                    break
            else:
                time.sleep(0.005)
        victim.wait()
        for conn in conns.values():
            conn.close()
        rows.append({"ms": None if done is None else round((done - killed_at) * 1000, 1), "tries": tries})
        note(f"etcd failover trial {trial}: first write after {rows[-1]['ms']} ms ({tries} tries)")
        etcd.procs[index] = subprocess.Popen(victim.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # the restarted member catches up before the next trial
    return rows


# ---------------------------------------------------------------------------
# voter replacement


async def voter_replace(cluster: DevCluster, timeout: float) -> dict:
    import trio

    from cloudless.errors import CloudlessError

    settled_from = time.perf_counter()
    before = await wait_healthy(cluster, voters=3, standby=1, timeout=90)
    settle_s = time.perf_counter() - settled_from
    await trio.sleep(1.0)
    before = await wait_healthy(cluster, voters=3, standby=1, timeout=30)
    leader = before.leader
    victim = sorted(v for v in before.voters if v != leader)[0]
    standby = [m.name for m in before.members if m.role != "voter"]
    survivors = [leader] + [n for n in cluster.addresses if n not in (leader, victim)]
    killed_wall = time.time()
    killed_at = time.perf_counter()
    cluster.kill(victim)
    seen: dict[str, float] = {}
    replaced = None
    final = None
    with trio.move_on_after(timeout):
        while replaced is None:
            try:
                reply = await status(cluster, *survivors, timeout=1.0)
            except CloudlessError:
                await trio.sleep(0.1)
                continue
            final = reply
            now = time.perf_counter() - killed_at
            state = next((m.state for m in reply.members if m.name == victim), "gone")
            seen.setdefault(f"status_{state}", now)
            if victim not in reply.voters:
                seen.setdefault("victim_not_voter", now)
            if len(reply.voters) == 3 and victim not in reply.voters:
                replaced = now
                break
            await trio.sleep(0.1)
    # The leader's event log says when gossip declared the victim dead and
    # what autopilot did about it, with reasons.
    events = await leader_events(cluster, survivors, killed_wall - 0.5, ("member.", "autopilot.", "raft."))

    def first(kind: str, node: str) -> float | None:
        for event in events:
            if event["kind"] == kind and event["node"] == node:
                return round(event["t_wall"] - killed_wall, 2)
        return None

    suspect_s = first("member.suspect", victim)
    dead_s = first("member.dead", victim)
    return {
        "cluster_settle_s": round(settle_s, 2),
        "leader": leader,
        "victim": victim,
        "standby_before": standby,
        "voters_after": final.voters if final else None,
        "voter_replace_s": None if replaced is None else round(replaced, 2),
        "dead_suspected_s": suspect_s,
        "dead_declared_s": dead_s,
        "status_seen_s": {k: round(v, 2) for k, v in seen.items()},
        "voter_replace_after_declared_s": (None if replaced is None or dead_s is None else round(replaced - dead_s, 2)),
        "events": [
            {"t_s": round(e["t_wall"] - killed_wall, 2), "kind": e["kind"], "node": e["node"], "message": e["message"]}
            for e in events
        ][:30],
    }


# ---------------------------------------------------------------------------
# idle footprint


def idle_footprint(cluster: DevCluster, window: float) -> dict:
    pids = {name: cluster.pid(name) for name in cluster.addresses}
    cpu = CpuWindow(pids)
    cpu.start()
    time.sleep(window)
    elapsed, used = cpu.stop()
    return {
        name: {"rss_mb": round(proc_rss_mb(pid), 1), "cpu_pct": round(100 * used[name] / elapsed, 2)}
        for name, pid in pids.items()
    }


# ---------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def record(out: dict, key: str, clients: int, value) -> None:
    out.setdefault(key, {})[str(clients)] = value


def judge(out: dict, clients: int) -> None:
    """The issue's targets beside the figures of this run."""
    c = str(clients)

    def target(figure: str, value, goal: str, met) -> dict:
        return {"figure": figure, "value": value, "target": goal, "met": None if value is None else met}

    ours, etcd = out.get("ours_ops_s", {}).get(c), out.get("etcd_ops_s", {}).get(c)
    p50, p95 = out.get("failover_p50_ms"), out.get("failover_p95_ms")
    after_dead = out.get("voter_replace_after_declared_s")
    rss = out.get("idle_rss_mb")
    out["targets"] = [
        target("failover_p50_ms", p50, "<= 500", p50 is not None and p50 <= 500),
        target("failover_p95_ms", p95, "<= 1000", p95 is not None and p95 <= 1000),
        target("voter_replace_after_declared_s", after_dead, "<= 20", after_dead is not None and after_dead <= 20),
        target(f"ours_ops_s[{c}]", ours, f">= etcd_ops_s[{c}] ({etcd})", None if not (ours and etcd) else ours >= etcd),
        target("idle_rss_mb", rss, "<= 80", rss is not None and rss <= 80),
    ]
    if ours is None or etcd is None:
        out["targets"][3]["met"] = None


def main() -> None:
    import trio

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short runs (~1-2 minutes in all)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per throughput run (10; quick 3)")
    parser.add_argument("--trials", type=int, default=None, help="failover trials (12; quick 3)")
    parser.add_argument("--idle-seconds", type=float, default=None, help="idle window (10; quick 5)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--only",
        action="append",
        choices=["ours", "failover", "replace", "etcd", "pysyncobj"],
        help="run only these parts (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    trials = args.trials if args.trials is not None else (3 if args.quick else 12)
    idle_seconds = args.idle_seconds or (5.0 if args.quick else 10.0)
    only = set(args.only or ["ours", "failover", "replace", "etcd", "pysyncobj"])
    top = max(args.clients)
    root = Path(tempfile.mkdtemp(prefix="cloudless-cluster-bench-"))
    started = time.perf_counter()
    out: dict = {
        "benchmark": "cluster",
        "mode": "quick" if args.quick else "full",
        "workload": {
            "value_chars": VALUE_CHARS,
            "keys": KEYS,
            "seconds_per_run": seconds,
            "clients": args.clients,
            "failover_trials": trials,
            "failover_try_timeout_s": FAILOVER_TRY_TIMEOUT,
            "etcd_failover_try_timeout_s": ETCD_TRY_TIMEOUT,
            "idle_window_s": idle_seconds,
            "ours": "3 `cloudless node` processes from `cloudless dev up` on loopback, Raft log fsynced; "
            "each client one ClusterClient (own mTLS connection), trio tasks in the bench process, "
            "writes sent to the leader (vars.put with client session)",
            "etcd": "Debian /usr/bin/etcd, 3 members on loopback, default fsync; HTTP/JSON gateway /v3/kv/put, "
            "one keep-alive connection and thread per client (benchmarks/raft.py runner)",
            "pysyncobj": "3 processes, appendEntriesUseBatch=False; load as threads inside the leader "
            "process (no client protocol); in-memory log, never fsyncs",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": loadavg(),
            "note": "cores shared with other jobs: figures are noisy",
        },
    }
    try:
        if only & {"ours", "failover"}:
            cluster = DevCluster(root / "ours3", 3, pick_base_port())
            try:
                up = cluster.up()
                note(f"3-node cluster up in {up['up_s']} s, leader {up['leader']}")
                healthy = trio.run(wait_healthy, cluster, 3)
                leader = healthy.leader
                out["ours_cluster"] = {"up_s": up["up_s"], "leader": leader, "voters": healthy.voters}
                if "ours" in only:
                    time.sleep(2.0)  # past start-up work (joins, promotions) before the idle window
                    idle = idle_footprint(cluster, idle_seconds)
                    note(f"idle: {idle}")
                    out["idle_per_node"] = idle
                    out["idle_rss_mb"] = idle[leader]["rss_mb"]
                    out["idle_cpu_pct"] = idle[leader]["cpu_pct"]
                    out["idle_measured_on"] = f"leader ({leader})"
                    out["idle_rss_mb_max"] = max(v["rss_mb"] for v in idle.values())
                    for clients in args.clients:
                        r = trio.run(load_ours, cluster, leader, clients, seconds)
                        note(f"ours, {clients} clients: {r}")
                        for k in ("ops_s", "p50_ms", "p99_ms", "errors", "cpu_pct", "cpu_ms_per_op"):
                            record(out, f"ours_{k}", clients, r[k])
                    follower = next(n for n in cluster.addresses if n != leader)
                    r = trio.run(load_ours, cluster, follower, top, seconds)
                    note(f"ours via follower {follower}, {top} clients: {r}")
                    for k in ("ops_s", "p50_ms", "p99_ms", "errors"):
                        record(out, f"ours_via_follower_{k}", top, r[k])
                    out["rss_after_load_mb"] = {n: round(proc_rss_mb(cluster.pid(n)), 1) for n in cluster.addresses}
                if "failover" in only and trials:
                    rows, restarts = run_failover(cluster, trials)
                    ok = [r["ms"] for r in rows if r["ms"] is not None]
                    out["failover_trials"] = rows
                    out["failover_cluster_restarts"] = restarts
                    out["failover_cluster_restarts_n"] = len(restarts)
                    out["failover_trials_ok"] = len(ok)
                    if ok:
                        out["failover_p50_ms"] = round(percentile(ok, 0.50), 1)
                        out["failover_p95_ms"] = round(percentile(ok, 0.95), 1)
                        out["failover_max_ms"] = round(max(ok), 1)
                    known = [r["leader_known_ms"] for r in rows if r["leader_known_ms"] is not None]
                    if known:
                        out["failover_leader_known_p50_ms"] = round(percentile(known, 0.50), 1)
            finally:
                cluster.down()

        if "replace" in only:
            cluster = DevCluster(root / "ours4", 4, pick_base_port())
            try:
                up = cluster.up()
                note(f"4-node cluster up in {up['up_s']} s")
                r = trio.run(voter_replace, cluster, 90.0)
                note(f"voter replacement: {json.dumps({k: v for k, v in r.items() if k != 'events'})}")
                out["voter_replace"] = r
                out["voter_replace_s"] = r["voter_replace_s"]
                out["voter_dead_declared_s"] = r["dead_declared_s"]
                out["voter_replace_after_declared_s"] = r["voter_replace_after_declared_s"]
            finally:
                cluster.down()

        if "etcd" in only and os.path.exists("/usr/bin/etcd"):
            etcd = raft_bench.EtcdCluster(root / "etcd")
            try:
                port = etcd.leader_port()
                for clients in args.clients:
                    r = raft_bench.load_etcd(port, clients, seconds)
                    note(f"etcd, {clients} clients: {r}")
                    for k in ("ops_s", "p50_ms", "p99_ms", "errors"):
                        record(out, f"etcd_{k}", clients, r[k])
                if "failover" in only and trials:
                    rows = etcd_failover(etcd, trials)
                    ok = [r["ms"] for r in rows if r["ms"] is not None]
                    out["etcd_failover_trials_ok"] = len(ok)
                    if ok:
                        out["etcd_failover_p50_ms"] = round(percentile(ok, 0.50), 1)
                        out["etcd_failover_p95_ms"] = round(percentile(ok, 0.95), 1)
            finally:
                etcd.stop()
        elif "etcd" in only:
            out["etcd"] = "not installed (/usr/bin/etcd)"

        if "pysyncobj" in only:
            try:
                import pysyncobj  # noqa: F401
            except ImportError:
                out["pysyncobj"] = "not installed (.venv/bin/pip install pysyncobj)"
            else:
                for clients, r in sorted(raft_bench.bench_pysyncobj(args.clients, seconds).items()):
                    note(f"pysyncobj, {clients} clients: {r}")
                    for k in ("ops_s", "p50_ms", "p99_ms", "errors"):
                        record(out, f"pysyncobj_{k}", clients, r[k])
                out["pysyncobj_fsync"] = False
    finally:
        if args.keep:
            note(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for clients in args.clients:
        ours = out.get("ours_ops_s", {}).get(str(clients))
        etcd = out.get("etcd_ops_s", {}).get(str(clients))
        pso = out.get("pysyncobj_ops_s", {}).get(str(clients))
        if ours and etcd:
            record(out, "ratio_vs_etcd", clients, round(ours / etcd, 3))
        if ours and pso:
            record(out, "ratio_vs_pysyncobj", clients, round(ours / pso, 3))
    judge(out, top)
    out["machine"]["loadavg_end"] = loadavg()
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
