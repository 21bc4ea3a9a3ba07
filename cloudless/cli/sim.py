"""`cloudless sim ...`: run the deterministic simulators from the command line."""

from __future__ import annotations

import click


@click.group(help="Run seeded simulations of the protocol cores.")
def sim() -> None:
    pass


def _register() -> None:
    # Each simulator lives in its own module so the subsystems stay apart.
    for module_name, attr in (("cloudless.cli.sim_raft", "raft"), ("cloudless.cli.sim_gossip", "gossip")):
        try:
            module = __import__(module_name, fromlist=[attr])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        sim.add_command(getattr(module, attr))


_register()
