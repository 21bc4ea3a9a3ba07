"""How every command prints, and how every error ends a command.

- Text for people: rich tables sized to the terminal; piped, plain columns
  that are never cut (IDs stay whole). Nothing a command prints is read as
  rich markup: names, keys and error messages come from outside.
- `-o json` (alias `--json`) and `-o yaml` print exactly one document on
  stdout. A list is `{"items": [...]}` (with any list-level fields beside
  it); one thing is its object. `-o wide` adds columns to tables.
- Every error is one line on stderr, `error: ...`, and exits with the
  error's code (0 ok, 1 failed, 2 usage, 3 not found, 4 conflict,
  5 unavailable); with `-o json|yaml` the error is the document instead.
  `report` is the one place that turns an exception into that; the command
  group (`cli/main.py`) calls it for anything a command raises.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import yaml
from rich.console import Console, ConsoleDimensions
from rich.table import Table
from rich.text import Text

from cloudless.errors import CloudlessError


class _Console(Console):
    """A rich console that cuts nothing when its stream is not a terminal.

    rich sizes a non-terminal stream to 80 columns (or to a terminal on
    stdin), which wraps long lines and truncates table cells (`runni…`).
    """

    @property
    def size(self) -> ConsoleDimensions:
        if not self.is_terminal:
            return ConsoleDimensions(_UNBOUNDED, 25)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


_UNBOUNDED = 1 << 20
# soft_wrap: print() never breaks a long line (a token, an ID) on a terminal either.
stdout = _Console(markup=False, highlight=False, emoji=False, soft_wrap=True)
stderr = _Console(stderr=True, markup=False, highlight=False, emoji=False, soft_wrap=True)

FORMATS = ("json", "yaml", "wide")
# click's Context.meta is shared by a command and its parents, so the group's
# error handling sees the format the command was asked for.
FORMAT_META = "cloudless.output.format"
EXIT_INTERRUPTED = 130
# click >= 8.2 raises this for a group called without a command (older versions print the help themselves).
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


@dataclass(frozen=True)
class OutputFormat:
    """What `-o` asked for: "text" (the default), "wide", "json" or "yaml"."""

    name: str = "text"

    @property
    def json(self) -> bool:
        return self.name == "json"

    @property
    def structured(self) -> bool:
        return self.name in ("json", "yaml")

    @property
    def wide(self) -> bool:
        return self.name == "wide"

    def emit(self, document: Any) -> None:
        """Print one document in the structured format asked for."""
        if self.name == "yaml":
            emit_yaml(document)
        else:
            emit_json(document)

    def emit_list(self, items: Sequence[Any], **fields: Any) -> None:
        self.emit(list_document(items, **fields))


TEXT = OutputFormat()
JSON = OutputFormat("json")


def list_document(items: Sequence[Any], **fields: Any) -> dict[str, Any]:
    """The one shape of a list: `{"items": [...]}`, list-level fields beside it."""
    return {**fields, "items": list(items)}


def emit_raw(text: str) -> None:
    """User data exactly as stored (a variable's value): no rich rendering, no tab expansion."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def emit_list(items: Sequence[Any], **fields: Any) -> None:
    emit_json(list_document(items, **fields))


class _YamlDumper(yaml.SafeDumper):
    """safe_dump, except that a string holding NEL (\x85) is double-quoted: with
    allow_unicode PyYAML writes it raw in a plain or single-quoted scalar, where
    a reader folds it as a line break (the value would not read back)."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"' if "\x85" in data else None)


_YamlDumper.add_representer(str, _represent_str)


def emit_yaml(document: Any) -> None:
    # Through JSON first so every value is a plain type safe_dump accepts (as emit_json: default=str).
    plain = json.loads(json.dumps(document, default=str))
    sys.stdout.write(
        yaml.dump(
            plain,
            Dumper=_YamlDumper,
            sort_keys=True,
            default_flow_style=False,
            allow_unicode=True,
            width=_UNBOUNDED,
        )
    )
    sys.stdout.flush()


# -- -o / --json ---------------------------------------------------------------------


def _remember_format(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # Eager, so a later bad argument still reports its error in the format asked for.
    if param.name == "as_json" and value:
        ctx.meta[FORMAT_META] = "json"
    elif param.name == "output_name" and value:
        ctx.meta.setdefault(FORMAT_META, value)
    return value


def resolve_format(as_json: bool, output_name: str | None) -> OutputFormat:
    if as_json and output_name not in (None, "json"):
        raise click.UsageError(f"--json and -o {output_name} disagree; give one")
    return OutputFormat("json" if as_json else output_name or "text")


def json_option(fn: Callable) -> Callable:
    """`--json` for commands whose only formats are text and JSON; passes `as_json`."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        is_eager=True,
        callback=_remember_format,
        help="Print exactly one JSON document.",
    )(fn)


def output_options(fn: Callable) -> Callable:
    """`-o json|yaml|wide` and `--json` (= `-o json`); passes `out: OutputFormat`.

    Adopt it on any read command: `@output_options def cmd(..., out): ...`, then
    `out.emit(doc)` / `out.emit_list(items)` when `out.structured`, else print
    text (`print_table(..., wide=out.wide)`).
    """

    @click.option(
        "-o",
        "--output",
        "output_name",
        type=click.Choice(FORMATS),
        default=None,
        is_eager=True,
        callback=_remember_format,
        help="Output format: json, yaml, or wide (a table with every column).",
    )
    @json_option
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, output_name: str | None, **kwargs: Any) -> Any:
        out = resolve_format(as_json, output_name)
        click.get_current_context().meta[FORMAT_META] = out.name
        return fn(*args, out=out, **kwargs)

    return wrapper


# -- tables ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Any], object]
    wide_only: bool = False


def print_table(columns: Sequence[Column], rows: Iterable[Any], *, wide: bool = False) -> None:
    """A table of `rows` (any objects; each column reads its cell from one).

    On a terminal, rich sizes it to the terminal's width and folds (never
    cuts) a cell that does not fit. Piped, plain columns separated by three
    spaces, each as wide as its widest cell, so `awk`/`cut` see whole values.
    """
    shown = [c for c in columns if wide or not c.wide_only]
    cells = [[_cell(c.value(row)) for c in shown] for row in rows]
    headers = [c.header for c in shown]
    if stdout.is_terminal:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for h in headers:
            table.add_column(h, overflow="fold")
        for r in cells:
            table.add_row(*r)
        stdout.print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for line in [headers, *cells]:
        sys.stdout.write("   ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n")
    sys.stdout.flush()


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    return one_line(str(value))


# -- errors ---------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """Text from outside as one printable line: no newlines, no terminal escapes."""
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _leaf(exc: BaseException) -> BaseException:
    """The error inside trio's exception groups: the first Cloudless error, else the first leaf."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        exc = next((e for e in leaves if isinstance(e, CloudlessError)), leaves[0])
    return exc


def _leaves(group: BaseExceptionGroup) -> Iterable[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


def as_cloudless_error(exc: BaseException) -> CloudlessError:
    """Any exception as the error the user sees, with its exit code."""
    exc = _leaf(exc)
    if isinstance(exc, CloudlessError):
        return exc
    if isinstance(exc, click.UsageError):
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        error = CloudlessError(exc.format_message().rstrip(".") + hint)
        error.exit_code, error.code = 2, "invalid"
        return error
    if isinstance(exc, click.ClickException):
        error = CloudlessError(exc.format_message())
        error.exit_code = exc.exit_code
        return error
    if isinstance(exc, PermissionError):
        return CloudlessError(f"permission denied: {exc.filename or exc.strerror}")
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return CloudlessError(f"{exc.strerror.lower()}{where}")
    return CloudlessError(
        f"internal error: {type(exc).__name__}: {exc} (CLOUDLESS_DEBUG=1 prints the traceback; please report it)"
    )


def report(exc: BaseException, format_name: str | None = None) -> int:
    """Print `exc` as the user sees it (a line on stderr, or the -o json|yaml document); return the exit code."""
    leaf = _leaf(exc)
    if isinstance(leaf, _NO_ARGS_IS_HELP) and leaf.ctx is not None:
        # `cloudless` or `cloudless vars` alone: the help, as docker and kubectl print it.
        sys.stdout.write(leaf.ctx.get_help() + "\n")
        return 0
    if isinstance(leaf, BrokenPipeError):
        # The reader went away (`| head`): nothing more to say; stop writing to the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if os.environ.get("CLOUDLESS_DEBUG") and not isinstance(leaf, (CloudlessError, click.ClickException)):
        traceback.print_exception(exc, file=sys.stderr)
    error = as_cloudless_error(leaf)
    if format_name in ("json", "yaml"):
        OutputFormat(format_name).emit(error.to_dict())
    else:
        print_error(error.message)
    return error.exit_code


def print_error(message: str) -> None:
    stderr.print(Text.assemble(("error:", "bold red"), " ", one_line(message)))


def fail(error: CloudlessError, as_json: bool = False) -> NoReturn:
    """Report an error and exit with its code; with --json (or the command's -o json|yaml) the error is the document."""
    ctx = click.get_current_context(silent=True)
    asked = ctx.meta.get(FORMAT_META) if ctx is not None else None
    raise SystemExit(report(error, "json" if as_json else asked))
