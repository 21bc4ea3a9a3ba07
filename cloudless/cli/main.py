"""The `cloudless` command.

Command modules are imported only when their command runs: importing every
subsystem (scheduler, QUIC, sandbox...) costs over a second on a small
device, and `cloudless vars get` should not pay for `cloudless run`. The
command table below is the whole list (nothing is discovered from the file
system), so a frozen bundle lists and loads the same commands as a wheel.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from cloudless import __version__, selfexec
from cloudless.cli import output

# name -> (module, attribute, one-line help shown by `cloudless --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "node": ("cloudless.cli.node", "node", "Run a node in the foreground."),
    "dev": ("cloudless.cli.dev", "dev", "A local development cluster on loopback."),
    "status": ("cloudless.cli.cluster", "status", "Show the cluster: leader, term, voters and members."),
    "nodes": ("cloudless.cli.cluster", "nodes", "List and remove nodes."),
    "vars": ("cloudless.cli.cluster", "vars", "The cluster's linearizable key-value store."),
    # cli.users attaches `token ls|rm` to cli.cluster's group, so `token` loads from there.
    "token": ("cloudless.cli.users", "token", "Bootstrap tokens for joining nodes and clients."),
    "users": ("cloudless.cli.users", "users", "Users: client certificates with a role."),
    "ca": ("cloudless.cli.ca", "ca", "The cluster CA: rotate, status, renew this context's certificate."),
    "events": ("cloudless.cli.cluster", "events", "Show cluster events (autopilot decisions, membership, joins)."),
    "run": ("cloudless.cli.workloads", "run", "Run a workload: keep N replicas of an image running."),
    "apply": ("cloudless.cli.workloads", "apply", "Create or update a workload from a YAML file."),
    "ps": ("cloudless.cli.workloads", "ps", "List workloads."),
    "inspect": ("cloudless.cli.workloads", "inspect", "Show a workload, its allocations and placement."),
    "logs": ("cloudless.cli.workloads", "logs", "Show (or follow) a workload's logs."),
    "exec": ("cloudless.cli.workloads", "exec_", "Run a command inside a replica."),
    "stop": ("cloudless.cli.workloads", "stop", "Stop a workload."),
    "scale": ("cloudless.cli.workloads", "scale", "Change a workload's replica count."),
    "update": ("cloudless.cli.workloads", "update", "Roll out a new version of a workload."),
    "image": ("cloudless.cli.image", "image", "Import, pull and list container images (the cluster's)."),
    "blob": ("cloudless.cli.blob", "blob", "Put, get, list and remove objects."),
    "s3": ("cloudless.cli.blob", "s3", "S3 gateway access keys."),
    "sim": ("cloudless.cli.sim", "sim", "Run seeded simulations of the protocol cores."),
    "context": ("cloudless.cli.context", "context", "Show and switch the client config's contexts."),
    "completion": ("cloudless.cli.completion", "completion", "Print the shell completion script (bash, zsh, fish)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        module = importlib.import_module(module_name)
        return getattr(module, attr)

    def invoke(self, ctx: click.Context) -> Any:
        # Every error a command raises ends here: one line (or the -o json|yaml document) and its exit code.
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            raise click.exceptions.Exit(output.report(exc, ctx.meta.get(output.FORMAT_META))) from None

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.Abort as exc:  # click turns Ctrl-C (KeyboardInterrupt) and EOF into Abort
            if isinstance(exc.__cause__, KeyboardInterrupt):
                code = output.EXIT_INTERRUPTED
            else:
                output.print_error("aborted")
                code = 1
        except Exception as exc:  # errors before a command runs, e.g. `cloudless --bogus`
            code = output.report(exc)
        else:
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        sys.exit(code)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cloudless")
def cli() -> None:
    """Cloudless: run containers on whatever devices you have."""


def main() -> None:
    selfexec.restore_library_path()
    selfexec.run_hidden_entry(sys.argv)
    cli(prog_name="cloudless")
