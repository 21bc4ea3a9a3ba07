"""`cloudless completion bash|zsh|fish`: the shell completion script.

The script calls back into `cloudless` (click's `_CLOUDLESS_COMPLETE`
protocol), so completions follow the installed version's commands.
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")
PROG = "cloudless"
COMPLETE_VAR = "_CLOUDLESS_COMPLETE"  # what click derives from the program name


@click.command(
    help=(
        "Print the shell completion script for SHELL. Load it with\n\n"
        '  bash: eval "$(cloudless completion bash)"   (e.g. in ~/.bashrc)\n\n'
        '  zsh:  eval "$(cloudless completion zsh)"    (e.g. in ~/.zshrc)\n\n'
        "  fish: cloudless completion fish > ~/.config/fish/completions/cloudless.fish"
    )
)
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    from cloudless.cli.main import cli

    cls = get_completion_class(shell)
    assert cls is not None  # every name in SHELLS is one click knows
    click.echo(cls(cli, {}, PROG, COMPLETE_VAR).source())
