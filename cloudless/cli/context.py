"""`cloudless context ls|current|use|rename|import`: the client config's contexts.

Edits go through `client_config.editing` (locked, written atomically, mode
0600): the file holds private keys. Nothing here prints a key or certificate.
"""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import click
from cryptography import x509

from cloudless.api import client_config
from cloudless.api.client_config import Context
from cloudless.cli import output
from cloudless.cli.output import Column, OutputFormat
from cloudless.errors import NotFound


def _config_option(fn):
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="Client config file (default: $CLOUDLESS_CONFIG, else ~/.cloudless/config.yaml).",
    )(fn)


@click.group(help="Show and switch the client config's contexts (one per cluster you can reach).")
def context() -> None:
    pass


def _expires(ctx: Context) -> str:
    try:
        cert = x509.load_pem_x509_certificate(ctx.certificate_pem)
    except ValueError:
        return "unreadable"
    return cert.not_valid_after_utc.astimezone(UTC).isoformat()


def _doc(ctx: Context, current: str) -> dict:
    return {
        "name": ctx.name,
        "cluster_id": ctx.cluster_id,
        "endpoints": list(ctx.endpoints),
        "current": ctx.name == current,
        "certificate_expires": _expires(ctx),
    }


_COLUMNS = [
    Column("CURRENT", lambda d: "*" if d["current"] else " "),
    Column("NAME", lambda d: d["name"]),
    Column("CLUSTER", lambda d: d["cluster_id"]),
    Column("ENDPOINTS", lambda d: ",".join(d["endpoints"])),
    Column("CERTIFICATE EXPIRES", lambda d: d["certificate_expires"][:19], wide_only=True),
]


@context.command("ls", help="List contexts; the current one is marked with *.")
@_config_option
@output.output_options
def ls(config_path: Path | None, out: OutputFormat) -> None:
    config = client_config.load(config_path)
    docs = [_doc(c, config.current_context) for c in config.contexts.values()]
    if out.structured:
        out.emit_list(docs, current=config.current_context or None, path=str(config.path))
        return
    output.print_table(_COLUMNS, docs, wide=out.wide)


@context.command("current", help="Print the current context's name (exit 3 if none is set).")
@_config_option
@output.output_options
def current(config_path: Path | None, out: OutputFormat) -> None:
    config = client_config.load(config_path)
    if not config.current_context:
        raise NotFound(f"{config.path}: no current context; choose one with `cloudless context use NAME`")
    ctx = config.context()
    if out.structured:
        out.emit(_doc(ctx, config.current_context))
    else:
        output.stdout.print(ctx.name)


@context.command("use", help="Make NAME the current context.")
@click.argument("name")
@_config_option
@output.json_option
def use(name: str, config_path: Path | None, as_json: bool) -> None:
    with client_config.editing(config_path) as config:
        config.use(name)
    if as_json:
        output.emit_json({"current": name, "path": str(config.path)})
    else:
        output.stdout.print(f"switched to context {name} ({config.path})")


@context.command("rename", help="Rename context OLD to NEW (the current context follows).")
@click.argument("old")
@click.argument("new")
@_config_option
@output.json_option
def rename(old: str, new: str, config_path: Path | None, as_json: bool) -> None:
    with client_config.editing(config_path) as config:
        config.rename(old, new)
    if as_json:
        output.emit_json({"renamed": {"from": old, "to": new}, "current": config.current_context or None})
    else:
        output.stdout.print(f"renamed context {old} to {new}")


@context.command(
    "import",
    help="Add the context of another client config FILE (e.g. a first node's admin.yaml) to yours. "
    "An existing context of the same name is kept; the new one gets a free name.",
)
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--name", default=None, help="Name for the context (default: its name in FILE).")
@click.option("--use", "make_current", is_flag=True, help="Also make it the current context.")
@_config_option
@output.json_option
def import_(file: Path, name: str | None, make_current: bool, config_path: Path | None, as_json: bool) -> None:
    source = client_config.load(file).context()
    if name is not None:
        source.name = name
    merged = client_config.merge_context(config_path, source, make_current=make_current, exact_name=name is not None)
    current = merged.is_current
    if as_json:
        output.emit_json(
            {"name": merged.name, "path": str(merged.path), "current": current, "unchanged": merged.already_present}
        )
        return
    what = "already in" if merged.already_present else "added to"
    output.stdout.print(f"context {merged.name} {what} {merged.path}" + (" (current)" if current else ""))
