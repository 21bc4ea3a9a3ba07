"""Cluster commands: status, nodes, vars, token, events."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec
import trio

from cloudless.api import client_config
from cloudless.api.client import ClusterClient
from cloudless.api.messages import (
    Deleted,
    Event,
    EventsFollow,
    MemberInfo,
    NodeRemove,
    StatusReply,
    StatusRequest,
    TokenCreate,
    TokenReply,
    VarItems,
    VarsCas,
    VarsGet,
    VarsList,
    VarsPut,
    VarsRm,
    VarValue,
)
from cloudless.cli.durations import Duration
from cloudless.cli.output import (
    Column,
    OutputFormat,
    emit_json,
    emit_raw,
    emit_yaml,
    json_option,
    one_line,
    output_options,
    print_table,
    stdout,
)
from cloudless.errors import CloudlessError, InvalidInput
from cloudless.state.commands import validate_var_key


def _client_command(fn: Callable, formats: bool) -> Callable:
    """--config/--context/--endpoint, then run `fn(client, ...)` under trio.

    Errors propagate to the command group, which prints them (cli/output.py).
    """

    @click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="Client config file.")
    @click.option("--context", "context_name", default=None, help="Context in the config (default: current).")
    @click.option("--endpoint", default=None, help="Talk to this HOST:PORT only (no failover).")
    @functools.wraps(fn)
    def wrapper(config_path, context_name, endpoint, **kwargs):
        config = client_config.load(config_path)
        context = config.context(context_name)
        if endpoint:
            client_config.parse_endpoint(endpoint)

        async def main():
            client = ClusterClient(context, endpoint=endpoint)
            try:
                result = await fn(client, **kwargs)
                await _refresh_credentials(client, config.path, context.name)
                return result
            finally:
                await client.aclose()

        trio.run(main)

    return output_options(wrapper) if formats else json_option(wrapper)


async def _refresh_credentials(client: ClusterClient, path: Path | None, context_name: str) -> None:
    """After a command: learn a CA rotation's next CA and re-issue the certificate when due.

    Never fails the command that ran: a refusal here is a warning on stderr.
    """
    from cloudless.api.client_renewal import refresh_credentials, save_refreshed

    if path is None:
        return
    try:
        fresh = await refresh_credentials(client)
    except CloudlessError as exc:
        if getattr(exc, "code", "") != "permission_denied":  # a node from before `ca rotate`, or a removed user
            click.echo(f"warning: could not refresh this context's credentials: {exc}", err=True)
        return
    if fresh.trust_changed and save_refreshed(path, context_name, client.context, fresh.credentials):
        what = "re-issued its certificate" if fresh.renewed else "learned the cluster's new CA"
        click.echo(f"note: context {context_name} {what} ({path})", err=True)


def client_options(fn: Callable) -> Callable:
    """A command that talks to the cluster: `fn(client, as_json, ...)`."""
    return _client_command(fn, formats=False)


def client_read_options(fn: Callable) -> Callable:
    """A read command that talks to the cluster: `fn(client, out, ...)` with `-o json|yaml|wide` and `--json`."""
    return _client_command(fn, formats=True)


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


# -- status / nodes -------------------------------------------------------------


@click.command(help="Show the cluster: leader, term, voters and members.")
@client_read_options
async def status(client: ClusterClient, out: OutputFormat) -> None:
    reply = await client.call("status", StatusRequest(), response=StatusReply)
    doc = to_builtins(reply)
    doc.pop("node", None)
    if out.structured:
        out.emit(doc)
        return
    stdout.print(
        f"cluster {reply.cluster_id}  leader {reply.leader or '-'}  term {reply.term}  commit {reply.commit_index}"
    )
    stdout.print(f"voters: {', '.join(reply.voters) or '-'}   learners: {', '.join(reply.learners) or '-'}")
    print_table(MEMBER_COLUMNS, reply.members, wide=out.wide)


def _power(m: MemberInfo) -> str:
    return m.power + (f" {m.battery_pct:.0f}%" if m.battery_pct is not None else "")


MEMBER_COLUMNS = [
    Column("ID", lambda m: m.id),
    Column("NAME", lambda m: m.name, wide_only=True),
    Column("ADDRESS", lambda m: m.address),
    Column("STATE", lambda m: m.state),
    Column("ROLE", lambda m: m.role),
    Column("REGION", lambda m: m.region),
    Column("ZONE", lambda m: m.zone),
    Column("POWER", _power),
    Column("NETWORK", lambda m: m.network),
    Column("RUNTIME", lambda m: m.runtime),
]


class _LsByDefault(click.Group):
    """`cloudless nodes [OPTIONS]` is `cloudless nodes ls [OPTIONS]`, as `cloudless nodes` is."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0].startswith("-") and args[0] not in ctx.help_option_names):
            args = ["ls", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_LsByDefault, help="List and remove nodes (`cloudless nodes` lists them).")
def nodes() -> None:
    pass


@nodes.command("ls", help="List the cluster's nodes.")
@client_read_options
async def nodes_ls(client: ClusterClient, out: OutputFormat) -> None:
    reply = await client.call("nodes.list", StatusRequest(), response=StatusReply)
    if out.structured:
        out.emit_list([to_builtins(m) for m in reply.members])
        return
    print_table(MEMBER_COLUMNS, reply.members, wide=out.wide)


@nodes.command("rm", help="Remove a node from the cluster and revoke its certificates.")
@click.argument("node_id")
@client_options
async def nodes_rm(client: ClusterClient, as_json: bool, node_id: str) -> None:
    try:
        request = NodeRemove(node_id)
        msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=NodeRemove)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid node id {node_id!r}: {exc}") from None
    await client.call("nodes.rm", request, response=StatusReply)
    if as_json:
        emit_json({"removed": node_id})
    else:
        stdout.print(f"removed {node_id}; its certificates are revoked")


# -- vars ----------------------------------------------------------------------


@click.group(help="The cluster's linearizable key-value store.")
def vars() -> None:
    pass


def _key(ctx, param, value):
    try:
        return validate_var_key(value)
    except CloudlessError as exc:
        raise click.BadParameter(exc.message) from None


def _var_doc(value: VarValue) -> dict:
    return {"key": value.key, "value": value.value, "index": value.index}


@vars.command("get", help="Read a variable (linearizable unless --stale).")
@click.argument("key", callback=_key)
@click.option("--stale", is_flag=True, help="Serve from the answering node's copy.")
@client_read_options
async def vars_get(client: ClusterClient, out: OutputFormat, key: str, stale: bool) -> None:
    value = await client.call("vars.get", VarsGet(key, stale), response=VarValue)
    if out.structured:
        out.emit(_var_doc(value))
    else:
        emit_raw(value.value)


@vars.command("put", help="Write a variable.")
@click.argument("key", callback=_key)
@click.argument("value")
@client_options
async def vars_put(client: ClusterClient, as_json: bool, key: str, value: str) -> None:
    request = VarsPut(key, value, client.client_id, client.next_seq())
    reply = await client.call("vars.put", request, response=VarValue)
    if as_json:
        emit_json(_var_doc(reply))
    else:
        stdout.print(f"{reply.key} = {reply.value} (index {reply.index})")


@vars.command(
    "cas", help="Write only if the variable's modify index is --index (0: must not exist). Exit 4 on conflict."
)
@click.argument("key", callback=_key)
@click.argument("value")
@click.option("--index", type=click.IntRange(min=0), required=True, help="Expected modify index.")
@client_options
async def vars_cas(client: ClusterClient, as_json: bool, key: str, value: str, index: int) -> None:
    request = VarsCas(key, value, index, client.client_id, client.next_seq())
    reply = await client.call("vars.cas", request, response=VarValue)
    if as_json:
        emit_json(_var_doc(reply))
    else:
        stdout.print(f"{reply.key} = {reply.value} (index {reply.index})")


@vars.command("rm", help="Delete a variable (optionally only at --index).")
@click.argument("key", callback=_key)
@click.option("--index", type=click.IntRange(min=1), default=None, help="Expected modify index.")
@client_options
async def vars_rm(client: ClusterClient, as_json: bool, key: str, index: int | None) -> None:
    reply = await client.call("vars.rm", VarsRm(key, index, client.client_id, client.next_seq()), response=Deleted)
    if as_json:
        emit_json({"key": reply.key, "deleted": True, "index": reply.index})
    else:
        stdout.print(f"deleted {reply.key}")


@vars.command("ls", help="List variables, optionally under a prefix.")
@click.argument("prefix", default="")
@click.option("--stale", is_flag=True)
@client_read_options
async def vars_ls(client: ClusterClient, out: OutputFormat, prefix: str, stale: bool) -> None:
    reply = await client.call("vars.ls", VarsList(prefix, stale), response=VarItems)
    if out.structured:
        out.emit_list([_var_doc(v) for v in reply.items])
        return
    print_table(VAR_COLUMNS, reply.items, wide=out.wide)


VAR_COLUMNS = [Column("KEY", lambda v: v.key), Column("VALUE", lambda v: v.value), Column("INDEX", lambda v: v.index)]


# -- tokens --------------------------------------------------------------------


@click.group(help="Bootstrap tokens for joining nodes and admins.")
def token() -> None:
    pass


@token.command("create", help="Create a bootstrap token; shown once.")
@click.option(
    "--ttl", type=Duration(1, 30 * 86400), default="15m", show_default=True, help="Lifetime, e.g. 90s, 15m, 2h."
)
@click.option("--uses", type=click.IntRange(1, 1_000_000), default=1, show_default=True)
@click.option(
    "--role",
    type=click.Choice(["node", "admin", "operator", "viewer"]),
    default="node",
    show_default=True,
    help="node: enrolls a device; admin/operator/viewer: a client with that role.",
)
@click.option(
    "--trust",
    type=click.Choice(["device", "coordinator"]),
    default="device",
    show_default=True,
    help="For node tokens: coordinator nodes may become Raft voters and hold the (sealed) CA key; "
    "devices never do. Give coordinator only to machines you would trust with the cluster.",
)
@client_options
async def token_create(client: ClusterClient, as_json: bool, ttl: float, uses: int, role: str, trust: str) -> None:
    if trust == "coordinator" and role != "node":
        raise InvalidInput("--trust coordinator is for node tokens", field="trust")
    wire_trust = "coordinator" if trust == "coordinator" else ""
    reply = await client.call("token.create", TokenCreate(ttl, uses, role, wire_trust), response=TokenReply)
    if as_json:
        emit_json(
            {
                "token": reply.token,
                "id": reply.id,
                "role": reply.role,
                "expires_at": reply.expires_at,
                "uses": reply.uses,
            }
        )
    else:
        stdout.print(reply.token)


# -- events --------------------------------------------------------------------


@click.command(help="Show cluster events (autopilot decisions, membership, joins).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("--last", type=click.IntRange(0, 10_000), default=100, show_default=True)
@client_read_options
async def events(client: ClusterClient, out: OutputFormat, follow: bool, last: int) -> None:
    collected: list[dict] = []
    async with client.stream("events", EventsFollow(follow, last), item=Event) as items:
        async for event in items:
            if out.structured and not follow:
                collected.append(to_builtins(event))
            elif out.json:
                emit_json(to_builtins(event))  # following: one document per line
            elif out.structured:
                emit_yaml(to_builtins(event))
                emit_raw("---")  # following: a YAML stream, one document per event
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
                stdout.print(f"{stamp} {event.kind:28} {event.node:20} {one_line(event.message)}")
    if out.structured and not follow:
        out.emit_list(collected)


cluster_commands = [status, nodes, vars, token, events]
