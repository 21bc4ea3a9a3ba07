"""`cloudless sim raft`: run seeded Raft cluster simulations with every fault on."""

from __future__ import annotations

import time

import click

from cloudless.cli.output import emit_json, stderr, stdout


def _nodes_for(seed: int, nodes: int | None) -> int:
    # Without --nodes, alternate 3- and 5-voter clusters: five voters allow
    # the histories (Figure 8) that three cannot produce.
    return nodes if nodes is not None else (3 if seed % 2 == 0 else 5)


def _run_one(args: tuple[int, int | None]) -> object:
    from cloudless.testing.raft_sim import SimConfig, run_seed

    seed, nodes = args
    result = run_seed(seed, SimConfig(nodes=_nodes_for(seed, nodes)))
    result.history = []  # not needed by the caller; keeps worker results small
    return result


@click.command(help="Simulate Raft clusters under faults; fail on any safety or linearizability violation.")
@click.option("--seeds", type=click.IntRange(min=1), default=100, show_default=True, help="How many seeds to run.")
@click.option("--first", type=click.IntRange(min=0), default=0, show_default=True, help="First seed.")
@click.option(
    "--nodes", type=click.IntRange(min=1, max=9), default=None, help="Founding voters (default: 3 or 5 by seed)."
)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def raft(seeds: int, first: int, nodes: int | None, jobs: int, as_json: bool) -> None:
    started = time.monotonic()
    work = [(seed, nodes) for seed in range(first, first + seeds)]
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(_run_one, work, chunksize=8)
    else:
        results = [_run_one(item) for item in work]

    failed = [r for r in results if not r.ok]  # type: ignore[attr-defined]
    ops_checked = sum(r.ops_checked for r in results)  # type: ignore[attr-defined]
    linearizable = all(r.linearizable is not False for r in results)  # type: ignore[attr-defined]
    elapsed = time.monotonic() - started
    for r in failed:
        stderr.print(r.describe(), markup=False, highlight=False)  # type: ignore[attr-defined]
    if as_json:
        emit_json(
            {
                "seeds": seeds,
                "violations": sum(len(r.violations) for r in failed),  # type: ignore[attr-defined]
                "failed_seeds": [r.seed for r in failed],  # type: ignore[attr-defined]
                "ops_checked": ops_checked,
                "linearizable": linearizable,
            }
        )
        stderr.print(f"raft simulation: seeds {first}..{first + seeds - 1} in {elapsed:.1f}s", highlight=False)
    else:
        verdict = "[green]ok[/green]" if not failed else f"[red]{len(failed)} failed[/red]"
        stdout.print(
            f"raft simulation: {seeds} seeds from {first}: {verdict}; "
            f"{ops_checked} operations checked for linearizability in {elapsed:.1f}s",
            markup=True,
        )
    if failed:
        raise SystemExit(1)
