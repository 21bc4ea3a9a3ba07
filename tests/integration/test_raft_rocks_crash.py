"""Crash recovery of RocksStorage: `kill -9` at random points loses nothing that was synced.

A child process replays a seeded schedule of storage operations (appends,
conflicting-suffix truncations, hard-state updates, compactions, snapshots),
calling sync() every few operations and printing `ack N` once N operations
are durable. The parent SIGKILLs it at a random moment, reopens the
directory, and requires the recovered storage to be *exactly* the state after
some operation M >= the last acknowledged N: every acknowledged write is
intact and the log is a clean prefix of the schedule (RocksDB replays its WAL
as a prefix of whole batches). The same schedule replayed on MemoryStorage
gives the expected state after each operation.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from cloudless.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from cloudless.raft.rocks import RocksStorage
from cloudless.raft.storage import MemoryStorage

OPS = 3000


def schedule(seed: int):
    """The deterministic operations for `seed`, with the model state after each one."""
    rng = random.Random(seed)
    mem = MemoryStorage()
    term, commit = 1, 0
    ops, states = [], [fingerprint(mem)]
    for _ in range(OPS):
        first, last = mem.first_index(), mem.last_index()
        snap_index = mem.snapshot().meta.index
        kind = rng.choices(["append", "conflict", "compact", "snapshot", "install"], [12, 2, 1, 1, 0.3])[0]
        if kind == "append":
            n = rng.randint(1, 6)
            entries = [Entry(term, i, 0, rng.randbytes(rng.randint(0, 64))) for i in range(last + 1, last + 1 + n)]
            commit = max(commit, rng.randint(commit, last))
            op = ("write", HardState(term, "n1", commit), entries, None)
        elif kind == "conflict":
            term += 1
            start = rng.randint(max(commit, snap_index) + 1, last + 1)
            entries = [Entry(term, i, 0, b"t%d" % term) for i in range(start, start + rng.randint(1, 4))]
            op = ("write", HardState(term, "n2", commit), entries, None)
        elif kind == "compact":
            op = ("compact", rng.randint(first - 1, max(first - 1, min(commit, snap_index))))
        elif kind == "snapshot":
            lo = max(snap_index, first - 1)
            op = ("create_snapshot", rng.randint(lo, max(lo, commit)), ConfState(voters=("n1",)), rng.randbytes(100))
        else:
            index = last + rng.randint(1, 20)
            term += 1
            commit = index
            op = (
                "write",
                HardState(term, "", commit),
                [],
                Snapshot(SnapshotMeta(index, term, ConfState(("n1", "n2"))), b"x" * 300),
            )
        apply(mem, op)
        ops.append(op)
        states.append(fingerprint(mem))
    return ops, states


def apply(storage, op):
    if op[0] == "write":
        storage.write(*op[1:])
    elif op[0] == "compact":
        storage.compact(op[1])
    else:
        storage.create_snapshot(*op[1:])


def fingerprint(s):
    first, last = s.first_index(), s.last_index()
    return (s.initial_state(), first, last, s.term(first - 1), tuple(s.entries(first, last + 1)), s.snapshot())


def child(path: str, seed: int) -> None:
    rng = random.Random(seed ^ 0x5EED)
    ops, _ = schedule(seed)
    storage = RocksStorage(path)
    print("ready", flush=True)
    for n, op in enumerate(ops, start=1):
        apply(storage, op)
        if rng.random() < 0.3:
            storage.sync()
            print(f"ack {n}", flush=True)
    storage.sync()
    print(f"ack {len(ops)}", flush=True)


def run_trial(tmp_path, seed: int) -> None:
    path = tmp_path / f"raft-{seed}"
    proc = subprocess.Popen(
        [sys.executable, __file__, "child", str(path), str(seed)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(__file__),
    )
    try:
        assert proc.stdout.readline().strip() == "ready", f"seed={seed}: child did not start"
        time.sleep(random.Random(seed).uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    acked = 0
    for line in proc.stdout.read().splitlines():
        if line.startswith("ack "):
            acked = int(line.split()[1])
    _, states = schedule(seed)
    with RocksStorage(path) as storage:
        recovered = fingerprint(storage)
        matches = [m for m, state in enumerate(states) if state == recovered]
        assert matches, f"seed={seed}: recovered storage is not the state after any operation (acked {acked})"
        assert max(matches) >= acked, (
            f"seed={seed}: lost acknowledged writes: state after op {max(matches)} < ack {acked}"
        )
        # The recovered storage keeps working.
        last = storage.last_index()
        storage.write(HardState(99, "n3", 0), [Entry(99, last + 1, 0, b"after")])
        storage.sync()
    with RocksStorage(path) as storage:
        assert storage.entries(last + 1, last + 2) == [Entry(99, last + 1, 0, b"after")]
    return acked, max(matches)


def test_kill_9_at_random_points_loses_no_synced_write_and_leaves_a_clean_prefix(tmp_path):
    outcomes = [run_trial(tmp_path, seed) for seed in range(8)]
    # The kills must land mid-run for this test to mean anything.
    assert any(0 < acked < OPS for acked, _ in outcomes), outcomes


@pytest.mark.slow
def test_kill_9_many_seeds(tmp_path):
    for seed in range(100, 300):
        run_trial(tmp_path, seed)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(sys.argv[2], int(sys.argv[3]))
