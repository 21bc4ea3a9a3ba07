"""Cluster commands: status, nodes, vars, token, events."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec
import trio
from rich.table import Table

from cloudless.api import client_config
from cloudless.api.client import ClusterClient
from cloudless.api.messages import (
    Deleted,
    Event,
    EventsFollow,
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
from cloudless.cli.output import emit_json, fail, stdout
from cloudless.errors import CloudlessError, InvalidInput
from cloudless.state.commands import validate_var_key


def client_options(fn: Callable) -> Callable:
    """--config/--context/--endpoint/--json, and error handling with exit codes."""

    @click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="Client config file.")
    @click.option("--context", "context_name", default=None, help="Context in the config (default: current).")
    @click.option("--endpoint", default=None, help="Talk to this HOST:PORT only (no failover).")
    @click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document.")
    @functools.wraps(fn)
    def wrapper(config_path, context_name, endpoint, as_json, **kwargs):
        try:
            config = client_config.load(config_path)
            context = config.context(context_name)
            if endpoint:
                client_config.parse_endpoint(endpoint)

            async def main():
                client = ClusterClient(context, endpoint=endpoint)
                try:
                    return await fn(client, as_json=as_json, **kwargs)
                finally:
                    await client.aclose()

            trio.run(main)
        except CloudlessError as exc:
            fail(exc, as_json)

    return wrapper


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


def duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r}: expected a duration such as 90s, 15m, 2h") from None


# -- status / nodes -------------------------------------------------------------


@click.command(help="Show the cluster: leader, term, voters and members.")
@client_options
async def status(client: ClusterClient, as_json: bool) -> None:
    reply = await client.call("status", StatusRequest(), response=StatusReply)
    doc = to_builtins(reply)
    doc.pop("node", None)
    if as_json:
        emit_json(doc)
        return
    stdout.print(
        f"cluster [bold]{reply.cluster_id}[/bold]  leader [bold]{reply.leader or '-'}[/bold]  term {reply.term}  commit {reply.commit_index}"
    )
    stdout.print(f"voters: {', '.join(reply.voters) or '-'}   learners: {', '.join(reply.learners) or '-'}")
    _members_table(reply)


def _members_table(reply: StatusReply) -> None:
    table = Table("ID", "ADDRESS", "STATE", "ROLE", "REGION", "ZONE", "POWER", "NETWORK", "RUNTIME")
    for m in reply.members:
        power = m.power + (f" {m.battery_pct:.0f}%" if m.battery_pct is not None else "")
        table.add_row(
            m.id, m.address, m.state, m.role, m.region or "-", m.zone or "-", power, m.network, m.runtime or "-"
        )
    stdout.print(table)


@click.group(help="List and remove nodes.", invoke_without_command=True)
@click.pass_context
def nodes(ctx) -> None:
    if ctx.invoked_subcommand is None:
        ctx.invoke(nodes_ls)


@nodes.command("ls", help="List the cluster's nodes.")
@client_options
async def nodes_ls(client: ClusterClient, as_json: bool) -> None:
    reply = await client.call("nodes.list", StatusRequest(), response=StatusReply)
    if as_json:
        emit_json([to_builtins(m) for m in reply.members])
        return
    _members_table(reply)


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


def _print_var(value: VarValue, as_json: bool) -> None:
    if as_json:
        emit_json({"key": value.key, "value": value.value, "index": value.index})
    else:
        stdout.print(value.value, markup=False, highlight=False)


@vars.command("get", help="Read a variable (linearizable unless --stale).")
@click.argument("key", callback=_key)
@click.option("--stale", is_flag=True, help="Serve from the answering node's copy.")
@client_options
async def vars_get(client: ClusterClient, as_json: bool, key: str, stale: bool) -> None:
    _print_var(await client.call("vars.get", VarsGet(key, stale), response=VarValue), as_json)


@vars.command("put", help="Write a variable.")
@click.argument("key", callback=_key)
@click.argument("value")
@client_options
async def vars_put(client: ClusterClient, as_json: bool, key: str, value: str) -> None:
    request = VarsPut(key, value, client.client_id, client.next_seq())
    reply = await client.call("vars.put", request, response=VarValue)
    if as_json:
        emit_json({"key": reply.key, "value": reply.value, "index": reply.index})
    else:
        stdout.print(f"{reply.key} = {reply.value} (index {reply.index})", markup=False, highlight=False)


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
        emit_json({"key": reply.key, "value": reply.value, "index": reply.index})
    else:
        stdout.print(f"{reply.key} = {reply.value} (index {reply.index})", markup=False, highlight=False)


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
@client_options
async def vars_ls(client: ClusterClient, as_json: bool, prefix: str, stale: bool) -> None:
    reply = await client.call("vars.ls", VarsList(prefix, stale), response=VarItems)
    if as_json:
        emit_json([{"key": v.key, "value": v.value, "index": v.index} for v in reply.items])
        return
    table = Table("KEY", "VALUE", "INDEX")
    for v in reply.items:
        table.add_row(v.key, v.value, str(v.index))
    stdout.print(table)


# -- tokens --------------------------------------------------------------------


@click.group(help="Bootstrap tokens for joining nodes and admins.")
def token() -> None:
    pass


@token.command("create", help="Create a bootstrap token; shown once.")
@click.option("--ttl", default="15m", show_default=True, help="Lifetime, e.g. 90s, 15m, 2h.")
@click.option("--uses", type=click.IntRange(1, 1_000_000), default=1, show_default=True)
@click.option("--role", type=click.Choice(["node", "admin"]), default="node", show_default=True)
@client_options
async def token_create(client: ClusterClient, as_json: bool, ttl: str, uses: int, role: str) -> None:
    seconds = duration(ttl)
    if not 0 < seconds <= 30 * 86400:
        raise InvalidInput("--ttl must be between 1s and 30d", field="ttl")
    reply = await client.call("token.create", TokenCreate(seconds, uses, role), response=TokenReply)
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
        stdout.print(reply.token, markup=False, highlight=False)


# -- events --------------------------------------------------------------------


@click.command(help="Show cluster events (autopilot decisions, membership, joins).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("--last", type=click.IntRange(0, 10_000), default=100, show_default=True)
@client_options
async def events(client: ClusterClient, as_json: bool, follow: bool, last: int) -> None:
    collected: list[dict] = []
    async with client.stream("events", EventsFollow(follow, last), item=Event) as items:
        async for event in items:
            if as_json and not follow:
                collected.append(to_builtins(event))
            elif as_json:
                print(json.dumps(to_builtins(event)), flush=True)  # one document per line when following
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
                stdout.print(f"{stamp} {event.kind:28} {event.node:20} {event.message}", markup=False, highlight=False)
    if as_json and not follow:
        emit_json(collected)


cluster_commands = [status, nodes, vars, token, events]
