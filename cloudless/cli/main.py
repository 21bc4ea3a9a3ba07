"""The `cloudless` command."""

from __future__ import annotations

import importlib

import click

from cloudless import __version__

# Command groups, one module each; a module that does not exist yet is
# simply not offered.
_COMMAND_MODULES = (
    ("cloudless.cli.sim", "sim"),
    ("cloudless.cli.pki", "token"),
    ("cloudless.cli.image", "image"),
    ("cloudless.cli.node", "node"),
    ("cloudless.cli.dev", "dev"),
    ("cloudless.cli.cluster", "cluster_commands"),
    ("cloudless.cli.blob", "blob"),
    ("cloudless.cli.blob", "s3"),
    ("cloudless.cli.workloads", "workload_commands"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cloudless")
def cli() -> None:
    """Cloudless: run containers on whatever devices you have."""


def _register() -> None:
    for module_name, attr in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        obj = getattr(module, attr)
        if isinstance(obj, (list, tuple)):
            for command in obj:
                cli.add_command(command)
        else:
            cli.add_command(obj)


_register()


def main() -> None:
    cli(prog_name="cloudless")
