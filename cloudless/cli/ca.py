"""`cloudless ca rotate|status|renew`: the cluster CA's rotation, and this context's certificate."""

from __future__ import annotations

import time
from pathlib import Path

import click
import trio

from cloudless.api import client_config
from cloudless.api.ca import CARotate, CAStatus
from cloudless.api.client import ClusterClient
from cloudless.api.client_renewal import Refreshed, refresh_credentials, save_refreshed
from cloudless.cli.cluster import client_options, client_read_options, to_builtins
from cloudless.cli.durations import Duration
from cloudless.cli.output import OutputFormat, emit_json, json_option, stdout
from cloudless.errors import Conflict
from cloudless.state.commands import MAX_CA_OVERLAP_S, MIN_CA_OVERLAP_S


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _print_status(status: CAStatus) -> None:
    stdout.print(f"phase:        {status.phase}")
    stdout.print(f"active CA:    {status.active_fingerprint}")
    if status.phase == "stable":
        return
    label = "next CA:     " if status.phase == "trust" else "previous CA: "
    stdout.print(f"{label} {status.other_fingerprint}")
    stdout.print(f"started:      {_when(status.started_at)}")
    stdout.print(f"activates:    {_when(status.activate_at)}")
    stdout.print(f"retires from: {_when(status.retire_at)}")
    stdout.print(f"old nodes:    {', '.join(status.old_nodes) or '-'}")
    stdout.print(f"old users:    {', '.join(status.old_users) or '-'}")
    for blocker in status.blockers:
        stdout.print(f"waiting:      {blocker}")


@click.group(help="The cluster CA: rotate it, see a rotation's progress, re-issue this context's certificate.")
def ca() -> None:
    pass


@ca.command(
    "rotate",
    help="Start a CA rotation: every node and client trusts a new CA beside the current one; from half "
    "the overlap on the new CA signs and everyone re-issues (clients the next time they run a command); "
    "after the overlap, once every node holds a new certificate, the old CA is retired.",
)
@click.option(
    "--overlap",
    type=Duration(MIN_CA_OVERLAP_S, MAX_CA_OVERLAP_S),
    default="24h",
    show_default=True,
    help="How long both CAs are trusted, e.g. 24h, 7d.",
)
@client_options
async def ca_rotate(client: ClusterClient, as_json: bool, overlap: float) -> None:
    status = await client.call("ca.rotate", CARotate(overlap), response=CAStatus)
    if as_json:
        emit_json(to_builtins(status))
    else:
        _print_status(status)


@ca.command("status", help="The CA rotation's phase, both CAs and who still holds certificates from the old one.")
@client_read_options
async def ca_status(client: ClusterClient, out: OutputFormat) -> None:
    status = await client.call("ca.status", b"", response=CAStatus)
    if out.structured:
        out.emit(to_builtins(status))
    else:
        _print_status(status)


@ca.command("renew", help="Re-issue this context's certificate now (same identity and role, a new key).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="Client config file.")
@click.option("--context", "context_name", default=None, help="Context in the config (default: current).")
@click.option("--endpoint", default=None, help="Talk to this HOST:PORT only (no failover).")
@json_option
def ca_renew(config_path: Path | None, context_name: str | None, endpoint: str | None, as_json: bool) -> None:
    config = client_config.load(config_path)
    context = config.context(context_name)
    if endpoint:
        client_config.parse_endpoint(endpoint)

    async def main() -> Refreshed:
        client = ClusterClient(context, endpoint=endpoint)
        try:
            return await refresh_credentials(client, force_renew=True)
        finally:
            await client.aclose()

    fresh = trio.run(main)
    assert config.path is not None
    if not save_refreshed(config.path, context.name, context, fresh.credentials):
        raise Conflict(f"context {context.name} changed while renewing; run `ca renew` again")
    expires_at = fresh.credentials.not_after.timestamp()
    doc = {
        "context": context.name,
        "serial": format(fresh.credentials.serial, "x"),
        "expires_at": expires_at,
        "cas": len(fresh.credentials.ca_certificates),
    }
    if as_json:
        emit_json(doc)
    else:
        stdout.print(
            f"context {context.name}: certificate {doc['serial']} until {_when(expires_at)}, "
            f"{doc['cas']} CA(s) trusted ({config.path})"
        )
