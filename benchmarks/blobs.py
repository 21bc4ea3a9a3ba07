"""Blob storage benchmark: single-node put/get beside the machine's own limit,
replicated put, dedup on a versioned data set, time to restore R.

    .venv/bin/python benchmarks/blobs.py [--size-mib N] [--trials T] [--dir D]

Prints one JSON object; the limit, put, get and R = 2 figures are medians of
T trials (default 3), each trial measuring the limit and ours back to back. Workload: one object of N MiB (default 1024) of
incompressible random bytes in a file on the same disk as the store.

- limit: `sha256sum FILE` and `cp FILE COPY && sync COPY`, timed separately on
  the same file in the same run; the limit is size / (sha256 seconds + copy
  seconds): hashing it once and writing it durably once, done back to back.
- put: `ObjectService.put_object` from the file (FastCDC ~1 MiB chunks, SHA-256
  per chunk, MD5 of the whole for the ETag, zstd probe, fsync per chunk + dir)
  into a LocalChunkStore with a RocksDB LocalMetadataStore, R = 1.
- get: `copy_range` (what the gateway and CLI use: 4 chunks read ahead in worker
  threads, each re-hashed and verified) into a sink that drops the bytes.
- replicated put (R = 2), two ways: (a) over loopback — the writer (this
  process) and peer processes (`benchmarks/blobs.py peer`), each with its own
  LocalChunkStore, the chunks going through RpcChunkPeers over the real
  TlsCarrier (mutually authenticated TLS 1.3 over TCP, stream mux), every
  chunk re-verified by its receiver; (b) the MemoryChunkPeers twin with two
  LocalChunkStores in this process (no network, no RPC).
- dedup: a 64 MiB file and 9 further versions, each with a few random
  inserts, deletes and overwrites; logical bytes / unique chunk bytes stored,
  and the bytes the second version sent to its replicas.
- restore: over loopback, the writer plus 3 peer processes, R = 2, 256 MiB
  (or the object size if smaller) in 16 MiB objects; a peer holding chunks
  is killed with SIGKILL and declared dead; seconds until anti-entropy rounds
  (over RPC; each copy is a pull by the target from a surviving holder) have
  restored R. Also the same in the memory twin.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

import trio  # noqa: E402

from cloudless.blobs.antientropy import repair_until_stable  # noqa: E402
from cloudless.blobs.catalog import LocalMetadataStore  # noqa: E402
from cloudless.blobs.chunkstore import LocalChunkStore, MemoryChunkStore  # noqa: E402
from cloudless.blobs.objects import ObjectService, iter_file  # noqa: E402
from cloudless.blobs.peers import MemoryChunkPeers  # noqa: E402
from cloudless.blobs.placement import StorageMember  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
CLUSTER = "bench"


# peer processes (loopback) ------------------------------------------------------------


def run_peer(args: argparse.Namespace) -> None:
    from cloudless.blobs.rpc import RpcChunkPeers, register_chunk_service
    from cloudless.pki.credentials import Credentials
    from cloudless.pki.revocation import RevocationList
    from cloudless.pki.verify import PeerVerifier
    from cloudless.transport.rpc import RpcClient, RpcServer
    from cloudless.transport.tls import TlsCarrier

    credentials = Credentials.load(Path(args.pki) / args.id)
    verifier = PeerVerifier(credentials.ca_certificate, RevocationList(), CLUSTER)
    carrier = TlsCarrier(credentials, verifier, bind=("127.0.0.1", args.port))
    store = LocalChunkStore(Path(args.dir))
    addresses = {n: ("127.0.0.1", int(p)) for n, p in (pair.split("=") for pair in args.peers.split(","))}
    # Anti-entropy copies are pulls: this process fetches from the source peer itself.
    pull_peers = RpcChunkPeers(RpcClient(TlsCarrier(credentials, verifier)), addresses.__getitem__)
    server = RpcServer()
    register_chunk_service(server, store, peers=pull_peers)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, carrier)
            print("ready", flush=True)

    trio.run(main)


class LoopbackPeers:
    """Peer processes on loopback plus this process's credentials as node n0."""

    def __init__(self, root: Path, peer_ids: list[str]) -> None:
        from cloudless.pki.ca import ClusterCA
        from cloudless.pki.credentials import issue_credentials
        from cloudless.pki.identity import Identity

        now = datetime.now(UTC)
        ca = ClusterCA.create(CLUSTER, now)
        self.root = root
        self.pki = root / "pki"
        for node_id in ["n0", *peer_ids]:
            issue_credentials(ca, Identity.node(CLUSTER, node_id), now).save(self.pki / node_id)
        self.addresses: dict[str, tuple[str, int]] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        for node_id in peer_ids:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.addresses[node_id] = ("127.0.0.1", s.getsockname()[1])
        peer_map = ",".join(f"{n}={port}" for n, (_, port) in self.addresses.items())
        for node_id in peer_ids:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE),
                    "peer",
                    "--id",
                    node_id,
                    "--port",
                    str(self.addresses[node_id][1]),
                    "--pki",
                    str(self.pki),
                    "--dir",
                    str(root / node_id),
                    "--peers",
                    peer_map,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"peer {node_id} did not start")
            self.procs[node_id] = proc

    def client(self):  # type: ignore[no-untyped-def]
        from cloudless.pki.credentials import Credentials
        from cloudless.pki.revocation import RevocationList
        from cloudless.pki.verify import PeerVerifier
        from cloudless.transport.rpc import RpcClient
        from cloudless.transport.tls import TlsCarrier

        credentials = Credentials.load(self.pki / "n0")
        verifier = PeerVerifier(credentials.ca_certificate, RevocationList(), CLUSTER)
        return RpcClient(TlsCarrier(credentials, verifier))

    def kill(self, node_id: str) -> None:
        proc = self.procs.pop(node_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for node_id in list(self.procs):
            self.kill(node_id)


async def replicated_loopback(src: Path, work: Path, size: int) -> dict:
    from cloudless.blobs.rpc import RpcChunkPeers

    cluster = LoopbackPeers(work, ["n1"])
    try:
        client = cluster.client()
        peers = RpcChunkPeers(client, cluster.addresses.__getitem__)
        meta = LocalMetadataStore(work / "meta")
        store = LocalChunkStore(work / "n0")
        service = ObjectService(meta, store, peers, lambda: members_of(["n0", "n1"]), node_id="n0", replication=2)
        await service.create_bucket("bench")
        start = time.perf_counter()
        manifest = await service.put_object("bench", "big", iter_file(str(src)), expected_size=size)
        put_s = time.perf_counter() - start
        held = await peers.has("n1", [c.digest for c in manifest.chunks])
        assert held == {c.digest for c in manifest.chunks} and store.has(held) == held
        await client.aclose()
        meta.close()
        store.close()
    finally:
        cluster.stop()
    return {
        "put_r2_mb_s": size / MIB / put_s,
        "replicas": 2,
        "carrier": "RpcChunkPeers over TlsCarrier (mTLS 1.3/TCP, loopback), 2 processes",
    }


async def restore_loopback(work: Path, total: int) -> dict:
    from cloudless.blobs.rpc import RpcChunkPeers

    peer_ids = ["n1", "n2", "n3"]
    cluster = LoopbackPeers(work, peer_ids)
    try:
        client = cluster.client()
        peers = RpcChunkPeers(client, cluster.addresses.__getitem__, timeout=5)
        nodes = peer_ids  # the writer stores nothing itself: every copy lives in a peer process
        dead: set[str] = set()
        meta = LocalMetadataStore(None)
        store = MemoryChunkStore()
        service = ObjectService(meta, store, peers, lambda: members_of(nodes, dead), node_id="n0", replication=2)
        await service.create_bucket("restore")
        rng = random.Random(3)
        per = 16 * MIB
        for i in range(max(1, total // per)):
            await service.put_object("restore", f"o{i}", rng.randbytes(per))
        referenced = await meta.referenced_digests()
        victim = "n2"
        lost = len(await peers.has(victim, sorted(referenced)))
        cluster.kill(victim)
        dead.add(victim)
        start = time.perf_counter()
        reports = await repair_until_stable(meta, members_of(nodes, dead), peers)
        seconds = time.perf_counter() - start
        restored = True
        for d in sorted(referenced):
            holders = [n for n in nodes if n not in dead and d in await peers.has(n, [d])]
            restored &= len(holders) >= 2
        await client.aclose()
    finally:
        cluster.stop()
    return {
        "restore_seconds": seconds,
        "restore_bytes": total,
        "chunks_on_dead_holder": lost,
        "copied": sum(r.copied for r in reports),
        "rounds": len(reports),
        "restored_r": restored,
        "carrier": "RpcChunkPeers over TlsCarrier (loopback), 3 peer processes, holder killed with SIGKILL",
    }


def write_random_file(path: Path, size: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MIB)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def machine_limit(src: Path, work: Path, size: int) -> dict:
    subprocess.run(["cat", str(src)], check=True, stdout=subprocess.DEVNULL)  # warm the page cache like the put sees it
    sha = timed(["sha256sum", str(src)])
    dst = work / "copy.bin"
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    subprocess.run(["sync", str(dst)], check=True)
    cp = time.perf_counter() - start
    dst.unlink()
    return {
        "sha256sum_mb_s": size / MIB / sha,
        "cp_sync_mb_s": size / MIB / cp,
        "limit_mb_s": size / MIB / (sha + cp),
    }


def median_of(results: list[dict]) -> dict:
    """Per-key median of numeric fields (other fields from the first result)."""
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in results)
    return out


def members_of(nodes, dead=()):  # type: ignore[no-untyped-def]
    return [StorageMember(n, capacity_bytes=100 * GIB, free_bytes=100 * GIB, alive=n not in dead) for n in nodes]


async def single_node(src: Path, work: Path, size: int) -> dict:
    meta = LocalMetadataStore(work / "meta")
    store = LocalChunkStore(work / "store")
    service = ObjectService(meta, store, replication=1)
    await service.create_bucket("bench")
    start = time.perf_counter()
    manifest = await service.put_object("bench", "big", iter_file(str(src)), expected_size=size)
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    got = 0

    async def discard(piece: bytes) -> None:
        nonlocal got
        got += len(piece)

    await service.copy_range(await service.head_object("bench", "big"), discard)
    get_s = time.perf_counter() - start
    assert got == size
    meta.close()
    store.close()
    return {
        "put_mb_s": size / MIB / put_s,
        "get_mb_s": size / MIB / get_s,
        "chunks": len(manifest.chunks),
        "mean_chunk_bytes": size // max(1, len(manifest.chunks)),
    }


async def replicated(src: Path, work: Path, size: int) -> dict:
    stores = {"n0": LocalChunkStore(work / "r0"), "n1": LocalChunkStore(work / "r1")}
    peers = MemoryChunkPeers(stores, threaded=True)  # type: ignore[arg-type]
    meta = LocalMetadataStore(work / "rmeta")
    service = ObjectService(meta, stores["n0"], peers, lambda: members_of(stores), node_id="n0", replication=2)
    await service.create_bucket("bench")
    start = time.perf_counter()
    manifest = await service.put_object("bench", "big", iter_file(str(src)), expected_size=size)
    put_s = time.perf_counter() - start
    assert all(len(peers.holders(c.digest)) == 2 for c in manifest.chunks)
    meta.close()
    for s in stores.values():
        s.close()
    return {"put_r2_mb_s": size / MIB / put_s, "replicas": 2, "carrier": "memory twin, two LocalChunkStores"}


def edit(data: bytes, rng: random.Random, edits: int = 4) -> bytes:
    buf = bytearray(data)
    for _ in range(edits):
        at = rng.randrange(len(buf))
        kind = rng.choice(["insert", "delete", "overwrite"])
        n = rng.randrange(1, 64 * 1024)
        if kind == "insert":
            buf[at:at] = rng.randbytes(n)
        elif kind == "delete":
            del buf[at : at + n]
        else:
            buf[at : at + n] = rng.randbytes(min(n, len(buf) - at))
    return bytes(buf)


async def dedup(versions: int = 10, base_mib: int = 64) -> dict:
    rng = random.Random(7)
    nodes = ["n0", "n1", "n2"]
    peers = MemoryChunkPeers({n: MemoryChunkStore() for n in nodes})
    service = ObjectService(
        LocalMetadataStore(None), peers.stores["n0"], peers, lambda: members_of(nodes), node_id="n0"
    )
    await service.create_bucket("ver")
    data = rng.randbytes(base_mib * MIB)
    logical = 0
    sent_per_version = []
    for v in range(versions):
        before = sum(peers.bytes_sent.values())
        await service.put_object("ver", f"file.v{v}", data)
        sent_per_version.append(sum(peers.bytes_sent.values()) - before)
        logical += len(data)
        data = edit(data, rng)
    unique = sum(s.info(d).size for s in [peers.stores["n0"]] for d in s.digests())
    stored_all = sum(s.info(d).size for s in peers.stores.values() for d in s.digests())
    return {
        "versions": versions,
        "version_mib": base_mib,
        "edits_per_version": 4,
        "logical_bytes": logical,
        "dedup_ratio": logical * 2 / stored_all,  # R = 2 copies of each unique chunk in both
        "second_version_wire_fraction": sent_per_version[1] / max(1, sent_per_version[0]),
        "median_later_version_wire_mib": statistics.median(sent_per_version[1:]) / MIB,
        "unique_bytes_on_writer": unique,
    }


async def restore(total: int) -> dict:
    nodes = ["n0", "n1", "n2", "n3"]
    peers = MemoryChunkPeers({n: MemoryChunkStore() for n in nodes})
    meta = LocalMetadataStore(None)
    dead: set[str] = set()
    service = ObjectService(meta, peers.stores["n0"], peers, lambda: members_of(nodes, dead), node_id="n0")
    await service.create_bucket("restore")
    rng = random.Random(3)
    per = 16 * MIB
    for i in range(max(1, total // per)):
        await service.put_object("restore", f"o{i}", rng.randbytes(per))
    victim = "n2"
    lost = len(list(peers.stores[victim].digests()))
    peers.kill(victim)
    dead.add(victim)
    start = time.perf_counter()
    reports = await repair_until_stable(meta, members_of(nodes, dead), peers)
    seconds = time.perf_counter() - start
    referenced = await meta.referenced_digests()
    restored = all(len(peers.holders(d)) >= 2 for d in referenced)
    return {
        "restore_seconds": seconds,
        "restore_bytes": total,
        "chunks_on_dead_holder": lost,
        "copied": sum(r.copied for r in reports),
        "rounds": len(reports),
        "restored_r": restored,
        "carrier": "memory twin (no network)",
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        peer = argparse.ArgumentParser()
        peer.add_argument("peer")
        for name in ("--id", "--pki", "--dir", "--peers"):
            peer.add_argument(name, required=True)
        peer.add_argument("--port", type=int, required=True)
        run_peer(peer.parse_args())
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir under /var/tmp)")
    parser.add_argument("--trials", type=int, default=3, help="repetitions of the limit/put/get/R=2 figures (medians)")
    args = parser.parse_args()
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="cloudless-bench-blobs-", dir=args.dir or "/var/tmp"))
    try:
        free = shutil.disk_usage(work).free
        if free < 5 * size:
            raise SystemExit(f"need {5 * size} bytes free in {work}, have {free}")
        src = work / "object.bin"
        write_random_file(src, size)
        # Trials interleave the limit and our figures so load changes hit both alike.
        limits, singles, loops, twins = [], [], [], []
        for trial in range(args.trials):
            limits.append(machine_limit(src, work, size))
            singles.append(trio.run(single_node, src, work / f"single{trial}", size))
            shutil.rmtree(work / f"single{trial}", ignore_errors=True)
            loops.append(trio.run(replicated_loopback, src, work / f"loopback{trial}", size))
            shutil.rmtree(work / f"loopback{trial}", ignore_errors=True)
            twins.append(trio.run(replicated, src, work / f"replicated{trial}", size))
            shutil.rmtree(work / f"replicated{trial}", ignore_errors=True)
        limit = median_of(limits)
        single = median_of(singles)
        rep_loop = median_of(loops)
        rep = median_of(twins)
        fractions = [s["put_mb_s"] / lim["limit_mb_s"] for s, lim in zip(singles, limits)]
        dd = trio.run(dedup)
        rs_loop = trio.run(restore_loopback, work / "restore", min(size, 256 * MIB))
        rs = trio.run(restore, min(size, 256 * MIB))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "blobs",
        "object_mib": args.size_mib,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "limit": limit,
        "single_node": single,
        "put_fraction_of_limit": statistics.median(fractions),
        "trials": args.trials,
        "per_trial": {
            "limit_mb_s": [round(x["limit_mb_s"], 1) for x in limits],
            "put_mb_s": [round(x["put_mb_s"], 1) for x in singles],
            "get_mb_s": [round(x["get_mb_s"], 1) for x in singles],
            "put_r2_loopback_mb_s": [round(x["put_r2_mb_s"], 1) for x in loops],
            "put_r2_twin_mb_s": [round(x["put_r2_mb_s"], 1) for x in twins],
        },
        "replicated_loopback": rep_loop,
        "replicated_twin": rep,
        "dedup": dd,
        "restore_loopback": rs_loop,
        "restore_twin": rs,
        "targets": {"put_fraction_of_limit": 0.5, "put_r2_mb_s": 100, "get_mb_s": 200},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
