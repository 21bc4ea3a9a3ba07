"""`cloudless sim gossip`: one SWIM + Lifeguard scenario in virtual time."""

from __future__ import annotations

import time

import click
from rich.table import Table

from cloudless.cli.output import emit_json, stdout
from cloudless.testing.gossip_sim import SimConfig, simulate


@click.command(help="Simulate gossip membership: crash detection, joins, false positives, bandwidth.")
@click.option("--nodes", type=click.IntRange(2, 20000), required=True, help="Members at the start.")
@click.option("--loss", type=click.FloatRange(0.0, 0.9), default=0.0, show_default=True, help="Packet loss rate.")
@click.option(
    "--kill", "kills", type=click.IntRange(0), default=0, show_default=True, help="Crashes, spread over the run."
)
@click.option(
    "--join",
    "joins",
    type=click.IntRange(0),
    default=None,
    help="Joins, spread over the run (default: as many as --kill).",
)
@click.option(
    "--stall",
    type=click.FloatRange(0.0, 0.5),
    default=0.0,
    show_default=True,
    help="Fraction of members that stall 2 s every 10 s.",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--duration", type=click.FloatRange(10.0), default=60.0, show_default=True, help="Virtual seconds.")
@click.option("--lifeguard", type=click.Choice(["on", "off"]), default="on", show_default=True)
@click.option(
    "--seal/--no-seal",
    default=False,
    show_default=True,
    help="AES-GCM seal every packet (slower; sizes are counted sealed either way).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def gossip(nodes, loss, kills, joins, stall, seed, duration, lifeguard, seal, as_json) -> None:
    if kills >= nodes:
        raise click.UsageError("--kill must be smaller than --nodes")
    cfg = SimConfig(
        nodes=nodes,
        seed=seed,
        duration=duration,
        loss=loss,
        kills=kills,
        joins=kills if joins is None else joins,
        stall_fraction=stall,
        lifeguard=lifeguard == "on",
        seal=seal,
    )
    started = time.process_time()
    result = simulate(cfg)
    doc = result.summary()
    doc["lifeguard"] = lifeguard
    doc["loss"] = loss
    doc["cpu_s"] = round(time.process_time() - started, 1)
    if as_json:
        emit_json(doc)
        return
    table = Table(title=f"gossip simulation, {nodes} members, seed {seed}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in doc.items():
        table.add_row(key, "-" if value is None else str(value))
    stdout.print(table)
