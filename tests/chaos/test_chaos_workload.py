"""The workload runner and fault schedule: histories from real servers in
namespace hosts go through the linearizability checker, which must accept a
durable single-copy register under faults and reject a stale replica."""

import json
import random

import pytest
import trio

from cloudless.testing.linearizability import VersionedRegisterModel, check_history
from tests.harness.chaos import (
    ChaosCluster,
    Heal,
    Isolate,
    Kill9,
    Loss,
    NotApplied,
    OneWay,
    Partition,
    Pause,
    Restart,
    Resume,
    Stop,
    VarsWorkload,
    load_history,
    random_schedule,
    run_workload,
)
from tests.harness.netns import Host


async def _register_op(port: int, host: Host, op: str, key: str, arg):
    """One request to the register server; outputs in VersionedRegisterModel shapes."""
    sock = trio.socket.socket()
    try:
        await sock.connect((host.ip, port))
    except ConnectionRefusedError as exc:
        sock.close()
        raise NotApplied("server down: nothing was sent") from exc
    async with trio.SocketStream(sock) as stream:
        await stream.send_all((json.dumps({"op": op, "key": key, "input": arg}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError("server closed the connection before answering")
            buf += chunk
    out = json.loads(buf)["output"]
    return tuple(out) if isinstance(out, list) else out


@pytest.mark.root
async def test_durable_register_history_is_linearizable_under_loss_kill9_and_partition(tmp_path, programs):
    seed = 20261129
    schedule = [
        (0.4, Loss(0, 0.5, "both")),
        (1.2, Heal()),
        (1.5, Kill9(0)),
        (2.0, Restart()),
        (2.3, Partition([[0], [1]])),
        (2.6, OneWay(1, 0)),
        (2.9, Heal()),
    ]
    workload = VarsWorkload(
        operate=lambda *a: _register_op(programs.port, *a),
        clients=4,
        keys=("a", "b"),
        duration_s=3.5,
        max_ops=5000,
        op_timeout_s=0.4,
        think_s=0.002,
        hosts=[0],
    )
    async with ChaosCluster(2, tmp_path, programs.register, seed=seed, extra={"flags": ""}) as cluster:
        await cluster.start(0)
        result = await cluster.run_workload(workload, schedule)
        check = result.check(timeout_s=60)
        report = f"{result.summary()}\n{check.explanation}\n{cluster.report()}"
        assert check.linearizable and not check.timed_out, report
        assert [what for _, what in result.faults] == [
            "loss host0 p=0.5 both",
            "heal",
            "kill -9 host0",
            "restart ['host0']",
            "partition [[0], [1]]",
            "one-way drop host1 -> host0",
            "heal",
            "end: heal",
            "end: resume []",
            "end: restart []",
        ], report
        counts = result.counts()
        # The faults produced every kind of outcome the checker has to handle.
        assert sum(n for k, n in counts.items() if k.endswith(":unknown")) > 0, report
        assert all(counts.get(f"{op}:ok", 0) > 20 for op in ("get", "put", "cas")), report
        assert result.not_applied > 0, report  # refused while killed
        assert cluster.process(0).starts == 2
        # The saved history replays to the same verdict.
        head, ops = load_history(tmp_path / f"history-{seed}.jsonl")
        assert head["seed"] == seed and len(ops) == len(result.history)
        assert check_history(ops, VersionedRegisterModel(), timeout_s=60).linearizable


@pytest.mark.root
async def test_stale_replica_history_is_rejected(tmp_path, programs):
    workload = VarsWorkload(
        operate=lambda *a: _register_op(programs.port, *a),
        clients=4,
        keys=("a",),
        duration_s=2.5,
        max_ops=1000,
        op_timeout_s=1.0,
        think_s=0.002,
    )
    async with ChaosCluster(2, tmp_path, programs.register, seed=7) as cluster:
        primary = cluster.process(0).address
        await cluster.start(0, flags="")
        await cluster.start(1, flags=f"--primary\0{primary}\0--lag\0{0.3}")
        result = await cluster.run_workload(workload)
        check = result.check(timeout_s=60)
        assert not check.linearizable and not check.timed_out, result.summary()
        assert check.key == "a" and "not linearizable" in check.explanation


class _MemoryRegister:
    """In-process versioned register with a scripted misbehaviour per call."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[str, int]] = {}
        self.index = 0
        self.calls = 0

    async def operate(self, host: Host, op: str, key: str, arg):
        self.calls += 1
        n = self.calls
        await trio.sleep(0.001)
        if n % 7 == 0:
            raise NotApplied("refused")
        if n % 11 == 0:
            self._apply(op, key, arg)  # applied, then the answer is lost
            raise ConnectionResetError("lost answer")
        if n % 13 == 0:
            await trio.sleep_forever()  # never answers: the runner's op timeout
        return self._apply(op, key, arg)

    def _apply(self, op, key, arg):
        current = self.data.get(key)
        if op == "get":
            return current
        if op == "put":
            self.index += 1
            self.data[key] = (arg, self.index)
            return self.index
        expected, value = arg
        if (current is None and expected == 0) or (current is not None and current[1] == expected):
            self.index += 1
            self.data[key] = (value, self.index)
            return (True, self.index)
        return (False, 0 if current is None else current[1])


async def test_runner_records_known_unknown_and_dropped_outcomes(autojump_clock):
    register = _MemoryRegister()
    hosts = [Host(0, "none", "192.0.2.250", "none")]  # never contacted: operate is in-process
    workload = VarsWorkload(
        operate=register.operate, clients=3, keys=("x", "y"), duration_s=60, max_ops=300, op_timeout_s=0.5
    )
    result = await run_workload(hosts, workload, seed=11)
    assert len(result.history) + result.not_applied == 300
    assert result.not_applied == 300 // 7
    unknown = [op for op in result.history if op.ret is None]
    assert result.errors["ConnectionResetError"] > 0 and result.errors["timeout"] > 0
    assert len(unknown) == result.errors["ConnectionResetError"] + result.errors["timeout"]
    # A client whose op is indeterminate carries on under a fresh id.
    assert len({op.client_id for op in unknown}) == len(unknown)
    for cid in {op.client_id for op in unknown}:
        assert [op for op in result.history if op.client_id == cid][-1].ret is None
    written = [op.input if op.op == "put" else op.input[1] for op in result.history if op.op in ("put", "cas")]
    assert len(written) == len(set(written)), "written values must be unique"
    check = result.check()
    assert check.linearizable, check.explanation


async def test_one_client_history_is_a_function_of_the_seed(autojump_clock):
    # With one client trio's task shuffling has nothing to reorder, so the
    # seed alone fixes every op, input and (virtual) time.
    hosts = [Host(0, "none", "192.0.2.250", "none")]

    async def history(seed):
        workload = VarsWorkload(
            operate=_MemoryRegister().operate, clients=1, duration_s=60, max_ops=100, op_timeout_s=0.5
        )
        ops = (await run_workload(hosts, workload, seed=seed)).history
        # Times are relative to a start that differs between runs: compare them rounded.
        return [(o.client_id, o.op, o.key, o.input, o.output, round(o.call, 6), o.ret and round(o.ret, 6)) for o in ops]

    first = await history(11)
    assert first == await history(11)
    assert first != await history(12)


async def test_runner_lets_unexpected_exceptions_fail_the_run(autojump_clock):
    async def buggy(host, op, key, arg):
        raise KeyError("bug in operate")

    hosts = [Host(0, "none", "192.0.2.250", "none")]
    with pytest.RaisesGroup(KeyError, flatten_subgroups=True):
        await run_workload(hosts, VarsWorkload(operate=buggy, clients=1, duration_s=1), seed=1)


async def test_runner_stops_at_its_duration_even_if_ops_hang(autojump_clock):
    async def hang(host, op, key, arg):
        await trio.sleep_forever()

    hosts = [Host(0, "none", "192.0.2.250", "none")]
    start = trio.current_time()
    result = await run_workload(hosts, VarsWorkload(operate=hang, clients=2, duration_s=3, op_timeout_s=1), seed=2)
    assert trio.current_time() - start <= 3 + 1 + 0.01
    assert len(result.history) == 2 * 3 and all(op.ret is None for op in result.history)


def test_random_schedule_is_seeded_bounded_and_repairs_every_fault():
    async def leader(cluster):
        return 0

    kinds = ("partition", "isolate", "one_way", "loss", "kill9", "stop", "pause")
    a = random_schedule(5, 5, 90.0, kinds=kinds, leader=leader)
    assert a == random_schedule(5, 5, 90.0, kinds=kinds, leader=leader)
    assert a != random_schedule(6, 5, 90.0, kinds=kinds, leader=leader)
    assert len(a) >= 10 and all(t <= 90.0 for t, _ in a)
    times = [t for t, _ in a]
    assert times == sorted(times)
    faults, repairs = a[0::2], a[1::2]
    for (_, fault), (_, repair) in zip(faults, repairs, strict=True):  # every fault has its repair
        expected = {Kill9: Restart, Stop: Restart, Pause: Resume}.get(type(fault), Heal)
        assert type(repair) is expected and repair.__dict__.get("target") is None
        assert not isinstance(fault, (Heal, Restart, Resume))
    assert {type(f) for _, f in faults} == {Partition, Isolate, OneWay, Loss, Kill9, Stop, Pause}
    assert {type(f) for _, f in random_schedule(5, 5, 90.0, leader=leader)[0::2]} == {
        Partition,
        Isolate,
        OneWay,
        Loss,
        Kill9,
    }
    assert any(getattr(f, "target", None) is leader for _, f in faults)
    for _, f in faults:
        if isinstance(f, Partition):
            assert sorted(h for g in f.groups for h in g) == list(range(5)) and all(f.groups)
        if isinstance(f, Loss):
            assert 0.1 <= f.p <= 0.5


def test_random_schedule_accepts_a_shared_rng():
    rng = random.Random(3)
    first = random_schedule(rng, 3, 20.0, kinds=("kill9",))
    second = random_schedule(rng, 3, 20.0, kinds=("kill9",))
    assert first != second and all(isinstance(f, (Kill9, Restart)) for _, f in first + second)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_durable_register_survives_a_random_schedule(tmp_path, programs, seed):
    # Soak: every fault kind, in a seeded order, against the single-copy register on host 0.
    kinds = ("partition", "isolate", "one_way", "loss", "kill9", "stop", "pause")
    schedule = random_schedule(seed, 3, 30.0, kinds=kinds, fault_s=(0.5, 2.0), calm_s=(0.2, 1.0))
    workload = VarsWorkload(
        operate=lambda *a: _register_op(programs.port, *a),
        clients=6,
        duration_s=32.0,
        max_ops=20000,
        op_timeout_s=0.5,
        think_s=0.005,
        hosts=[0],
    )
    async with ChaosCluster(3, tmp_path, programs.register, seed=seed, extra={"flags": ""}) as cluster:
        await cluster.start(0)
        result = await cluster.run_workload(workload, schedule)
        check = result.check(timeout_s=300)
        assert check.linearizable, f"{result.summary()}\n{check.explanation}"
        assert len(result.faults) == len(schedule) + 3, result.summary()
