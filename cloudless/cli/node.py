"""`cloudless node`: run this device's node in the foreground."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import click
import trio

from cloudless.api import client_config
from cloudless.api.client_config import parse_endpoint
from cloudless.cli.durations import Duration
from cloudless.cli.output import fail, one_line, stderr
from cloudless.errors import CloudlessError, InvalidInput


def _endpoint(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_endpoint(value)
    except CloudlessError as exc:
        raise click.BadParameter(exc.message) from None


def _labels(ctx, param, values):
    labels: dict[str, str] = {}
    for item in values:
        key, sep, val = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}", key) or len(val) > 253:
            raise click.BadParameter(f"{item!r}: expected key=value (key: letters, digits, . _ / -)")
        labels[key] = val
    return labels


def default_data_dir() -> Path:
    return Path(os.environ.get("CLOUDLESS_DATA_DIR") or Path.home() / ".cloudless" / "node")


def client_config_target(explicit: Path | None, disabled: bool, interactive: bool) -> Path | None:
    """Where a new cluster's admin context goes: the client config the user's CLI reads.

    Only when asked (--client-config) or when a person started the node on a
    terminal: an unattended start (dev up, a service, a test harness) must not
    write into its account's config, and cannot be asked about it.
    """
    if disabled:
        return None
    if explicit is not None:
        return explicit
    return client_config.default_path() if interactive else None


def announce_bootstrap(admin_config: Path, target: Path | None) -> None:
    """Merge the new cluster's admin context into `target` (if any) and say exactly what happened."""
    say = stderr.print
    admin_config = admin_config.absolute()
    say(f"created a new cluster; its admin client config is {admin_config}")
    import_hint = f"cloudless context import {admin_config}"
    if target is None:
        say(f"to use it: `{import_hint} --use`, or `export CLOUDLESS_CONFIG={admin_config}`")
        return
    try:
        context = client_config.load(admin_config).context()
        merged = client_config.merge_context(target, context)
    except (CloudlessError, OSError) as exc:
        message = exc.message if isinstance(exc, CloudlessError) else str(exc)
        say(f"could not add it to {target}: {one_line(message)}")
        say(f"to use it: `{import_hint} --use`, or `export CLOUDLESS_CONFIG={admin_config}`")
        return
    where = f"{merged.path.absolute()}" + (" (a new file)" if merged.created_file else "")
    if merged.already_present:
        say(f"context {merged.name} is already in {where}")
    else:
        say(f"added context {merged.name} to {where}")
    if merged.is_current:
        say(f"it is the current context: try `cloudless status{_config_hint(merged.path)}`")
    else:
        say(f"switch to it with `cloudless context use {merged.name}{_config_hint(merged.path)}`")


def _config_hint(path: Path) -> str:
    """The --config a later command needs, unless the CLI finds `path` by itself."""
    return "" if path.absolute() == client_config.default_path().absolute() else f" --config {path.absolute()}"


@click.command(help="Run a node in the foreground. With no --join and an empty data dir it creates a new cluster.")
@click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None, help="Node state (default ~/.cloudless/node)."
)
@click.option(
    "--listen", default="127.0.0.1:7946", show_default=True, callback=_endpoint, help="HOST:PORT for UDP and TCP."
)
@click.option(
    "--advertise", default=None, callback=_endpoint, help="HOST:PORT other nodes reach us at (default: --listen)."
)
@click.option("--join", default=None, callback=_endpoint, help="HOST:PORT of any member of the cluster to join.")
@click.option("--token", default=None, envvar="CLOUDLESS_TOKEN", help="Bootstrap token from `cloudless token create`.")
@click.option("--name", default=None, help="Node name (default: host name plus a random suffix).")
@click.option("--region", default="", help="Region label used for placement.")
@click.option("--zone", default="", help="Zone label used for placement and voter spread.")
@click.option("--label", "labels", multiple=True, callback=_labels, help="key=value node label (repeatable).")
@click.option("--power", type=click.Choice(["ac", "battery"]), default=None, help="Override detected power source.")
@click.option("--battery", type=click.FloatRange(0, 100), default=None, help="Override detected battery percent.")
@click.option(
    "--network", type=click.Choice(["wired", "wifi", "metered"]), default=None, help="Override detected network."
)
@click.option(
    "--device-class",
    type=click.Choice(["server", "pc", "laptop", "phone", "gateway"]),
    default=None,
    help="What this device is, for placement constraints (default: laptop when it has a battery, else server).",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "runc", "rootless", "none"]),
    default=None,
    help="Container runtime (default auto: runc when root with runc and cgroups; rootless when not root "
    "with runc and working user namespaces; else none). "
    "`none` for devices that must never run containers; the scheduler places nothing there.",
)
@click.option(
    "--voter-stabilization",
    type=Duration(0, 3600),
    default="10s",
    show_default=True,
    help="How long a new member must stay alive before autopilot makes it a voter (10s, 1m; seconds).",
)
@click.option("--metrics-listen", default=None, callback=_endpoint, help="HOST:PORT for HTTPS /metrics (mTLS).")
@click.option(
    "--s3-listen", default=None, callback=_endpoint, help="HOST:PORT for the HTTPS S3 gateway (default: off)."
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@click.option(
    "--client-config",
    "client_config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="When this node creates a cluster, add its admin context to this client config. "
    "Default: $CLOUDLESS_CONFIG or ~/.cloudless/config.yaml when started on a terminal; otherwise only printed.",
)
@click.option("--no-client-config", is_flag=True, help="Never add the new cluster's context to a client config.")
def node(
    data_dir,
    listen,
    advertise,
    join,
    token,
    name,
    region,
    zone,
    labels,
    power,
    battery,
    network,
    device_class,
    runtime,
    voter_stabilization,
    metrics_listen,
    s3_listen,
    log_level,
    client_config_path,
    no_client_config,
) -> None:
    from cloudless.coordinator.autopilot import AutopilotConfig
    from cloudless.node.process import NodeOptions, run_node
    from cloudless.observability.logging import configure

    data_dir = data_dir or default_data_dir()
    if join is not None and not token:
        raise click.UsageError("--join needs --token (or CLOUDLESS_TOKEN)")
    if listen[1] == 0:
        raise click.BadParameter("needs an explicit port", param_hint="--listen")
    if advertise is None and listen[0] in ("0.0.0.0", "::"):
        raise click.BadParameter("listening on all addresses needs --advertise HOST:PORT", param_hint="--advertise")
    if client_config_path is not None and no_client_config:
        raise click.UsageError("--client-config and --no-client-config disagree; give one")
    target = client_config_target(client_config_path, no_client_config, sys.stdin.isatty())
    configure(Path(data_dir) / "logs", log_level)
    options = NodeOptions(
        data_dir=Path(data_dir),
        listen=listen,
        advertise=advertise,
        join=join,
        token=token,
        name=name,
        region=region,
        zone=zone,
        labels=labels,
        power=power,
        battery=battery,
        network=network,
        device_class=device_class,
        runtime=runtime,
        autopilot=AutopilotConfig(stabilization_s=voter_stabilization),
        log_level=log_level,
        metrics_listen=metrics_listen,
        s3_listen=s3_listen,
        on_bootstrapped=functools.partial(announce_bootstrap, target=target),
    )
    try:
        trio.run(run_node, options)
    except CloudlessError as exc:
        fail(exc, as_json=False)
    except KeyboardInterrupt:
        stderr.print("stopped")
    except OSError as exc:
        fail(InvalidInput(f"cannot start the node: {exc}"), as_json=False)
