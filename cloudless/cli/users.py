"""`cloudless users` and `cloudless token ls|rm`: who may use the cluster."""

from __future__ import annotations

import time
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from cloudless.api import client_config
from cloudless.api.client import ClusterClient
from cloudless.api.identities import TokenList, TokenRef, UserAdd, UserCertificate, UserList, UserRef
from cloudless.cli.cluster import client_options, client_read_options, to_builtins, token
from cloudless.cli.durations import Duration
from cloudless.cli.output import JSON, TEXT, Column, OutputFormat, emit_json, print_table, stdout
from cloudless.errors import Conflict
from cloudless.pki.credentials import make_csr, new_private_key, private_key_pem
from cloudless.pki.identity import Identity


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@click.group(help="Users: client certificates with a role (admin, operator, viewer).")
def users() -> None:
    pass


@users.command(
    "add",
    help="Issue a client certificate for NAME with --role and write a client config for it. "
    "The key is made here and never leaves this machine; hand the file to the user.",
)
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "operator", "viewer"]), required=True)
@click.option(
    "--ttl",
    type=Duration(60, 366 * 86400),
    default="30d",
    show_default=True,
    help="Certificate lifetime, e.g. 12h, 30d (at most 366d).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Client config to write (default: ./NAME.yaml); refuses to overwrite.",
)
@client_options
async def users_add(client: ClusterClient, as_json: bool, name: str, role: str, ttl: float, out: Path | None) -> None:
    out = out or Path(f"{name}.yaml")
    if out.exists():
        raise Conflict(f"{out} exists; choose another --out")
    key = new_private_key()
    csr = make_csr(key, Identity.client(client.context.cluster_id, name))
    reply = await client.call(
        "users.add",
        UserAdd(name, role, csr.public_bytes(serialization.Encoding.PEM), ttl),
        response=UserCertificate,
    )
    context = client_config.Context(
        name=f"{client.context.cluster_id}-{name}",
        cluster_id=client.context.cluster_id,
        endpoints=list(client.context.endpoints),
        ca_pem=reply.ca_pem,
        certificate_pem=reply.cert_pem,
        key_pem=private_key_pem(key),
    )
    client_config.ClientConfig(contexts={context.name: context}, current_context=context.name).save(out)
    if as_json:
        emit_json({"name": reply.name, "role": reply.role, "expires_at": reply.not_after, "config": str(out)})
    else:
        stdout.print(
            f"{reply.name} ({reply.role}) until {_when(reply.not_after)}: wrote {out} "
            f"(use it with --config {out}, CLOUDLESS_CONFIG={out}, or `cloudless context import {out}`)"
        )


_USER_COLUMNS = [
    Column("NAME", lambda u: u.name),
    Column("ROLE", lambda u: u.role),
    Column("CERTIFICATES", lambda u: u.certificates),
    Column("EXPIRES", lambda u: _when(u.expires_at)),
]


def _print_users(reply: UserList, out: OutputFormat) -> None:
    if out.structured:
        out.emit_list([to_builtins(u) for u in reply.items])
    else:
        print_table(_USER_COLUMNS, reply.items, wide=out.wide)


@users.command("ls", help="List users and their roles.")
@client_read_options
async def users_ls(client: ClusterClient, out: OutputFormat) -> None:
    _print_users(await client.call("users.list", b"", response=UserList), out)


@users.command("rm", help="Remove a user: revoke every certificate it holds and end its open connections.")
@click.argument("name")
@client_options
async def users_rm(client: ClusterClient, as_json: bool, name: str) -> None:
    _print_users(await client.call("users.rm", UserRef(name), response=UserList), JSON if as_json else TEXT)


_TOKEN_COLUMNS = [
    Column("ID", lambda t: t.id),
    Column("ROLE", lambda t: t.role),
    Column("USES", lambda t: f"{t.uses}/{t.max_uses}"),
    Column("EXPIRES", lambda t: _when(t.expires_at)),
]


def _print_tokens(reply: TokenList, out: OutputFormat) -> None:
    if out.structured:
        out.emit_list([to_builtins(t) for t in reply.items])
    else:
        print_table(_TOKEN_COLUMNS, reply.items, wide=out.wide)


@token.command("ls", help="List unexpired bootstrap tokens (never their secrets).")
@client_read_options
async def token_ls(client: ClusterClient, out: OutputFormat) -> None:
    _print_tokens(await client.call("token.list", b"", response=TokenList), out)


@token.command("rm", help="Withdraw a bootstrap token.")
@click.argument("token_id")
@client_options
async def token_rm(client: ClusterClient, as_json: bool, token_id: str) -> None:
    _print_tokens(await client.call("token.rm", TokenRef(token_id), response=TokenList), JSON if as_json else TEXT)
