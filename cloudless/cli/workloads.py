"""Workload commands: run, ps, inspect, logs, exec, stop, scale, update, apply."""

from __future__ import annotations

import json
import os
import signal
import sys
import termios
import tty as tty_mode
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import click
import msgspec
import trio
from rich.table import Table

from cloudless.agent.messages import (
    EXEC_CHUNK,
    ExecEvent,
    ExecExit,
    ExecResize,
    ExecStdin,
    ExecStdinClose,
    LogLine,
)
from cloudless.api.client import ClusterClient
from cloudless.api.workloads import (
    DryRun,
    InspectReply,
    PsReply,
    PsRequest,
    RunWorkload,
    ScaleRequest,
    UpdateRequest,
    WorkloadExec,
    WorkloadLogs,
    WorkloadRef,
    WorkloadReply,
)
from cloudless.cli.cluster import client_options, client_read_options, to_builtins
from cloudless.cli.output import Column, OutputFormat, emit_json, emit_list, print_table, stdout
from cloudless.coordinator.preview import Preview
from cloudless.errors import CloudlessError, InvalidInput, Unavailable
from cloudless.state.workload import WorkloadName, from_flags, parse_yaml
from cloudless.transport.rpc import DuplexStream

_NAME = msgspec.json.Decoder(WorkloadName)


def _name(ctx, param, value):
    if value is None:
        return value
    try:
        return _NAME.decode(json.dumps(value))
    except msgspec.ValidationError:
        raise click.BadParameter(
            f"{value!r} is not a workload name (a DNS label: lowercase letters, digits, '-')"
        ) from None


def _reply_doc(reply: WorkloadReply) -> dict:
    return {"name": reply.name, "version": reply.version, "index": reply.index}


_ACTION_WORDS = {"create": "create", "update": "update to", "scale": "rescale as", "unchanged": "leave unchanged at"}


async def _dry_run(client: ClusterClient, as_json: bool, spec, replace: bool) -> None:
    """Show what submitting `spec` would do now (the leader's scheduler on the live state);
    exit 1 when the cluster would refuse it."""
    p = await client.call("workloads.dry_run", DryRun(spec, replace), response=Preview)
    if as_json:
        emit_json(to_builtins(p))
    else:
        _print_preview(p)
    if p.refused:
        raise SystemExit(1)


def _print_preview(p: Preview) -> None:
    def say(text: str) -> None:
        stdout.print(text, markup=False, highlight=False)

    say(
        f"{p.name}: would {_ACTION_WORDS[p.action]} version {p.version} ({p.replicas} replica(s)); dry run, nothing changed"
    )
    for k in p.kept:
        say(f"  replica {k.replica} stays on {k.node} ({k.allocation}, {k.state})")
    for x in p.placements:
        say(f"  replica {x.replica} → {x.node}  (score {x.score:+.3f}; {x.feasible} of {p.nodes} nodes feasible)")
    for f in p.failures:
        say(f"  replica {f.replica} not placed: {f.message}")
    for stop in p.stops:
        say(f"  replica {stop.replica} on {stop.node} would stop ({stop.allocation}: {stop.reason})")
    for note in p.notes:
        say(f"  note: {note}")
    if p.node_reasons:
        say("nodes that could not take a replica:")
        for node, why in sorted(p.node_reasons.items()):
            say(f"  {node}: {why}")
    if p.refused:
        say(f"the cluster would refuse it: {p.refused}")


@click.command(help="Run IMAGE as a replicated workload: cloudless run IMAGE [options] -- CMD...")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--name", default=None, callback=_name, help="Workload name (default: from the image).")
@click.option("--replicas", type=click.IntRange(0, 100_000), default=1, show_default=True)
@click.option("--cpu", default=None, help="CPU per replica: cores (0.5) or millicores (500m).")
@click.option("--memory", default=None, help="Memory per replica: 256Mi, 1Gi, 512M.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable (repeatable).")
@click.option("--port", "ports", multiple=True, metavar="[HOST:]CONTAINER[/PROTO]", help="Port (repeatable).")
@click.option("--restart", default=None, metavar="always|never|on-failure[:MAX]")
@click.option(
    "--constraint", "constraints", multiple=True, metavar="EXPR", help="e.g. zone=a, 'class in pc,server' (repeatable)."
)
@click.option("--spread", "spreads", multiple=True, metavar="ATTR[:MAX]", help="e.g. node, zone, node:1 (repeatable).")
@click.option("--dry-run", is_flag=True, help="Validate and show where each replica would go; change nothing.")
@client_options
async def run(
    client: ClusterClient,
    as_json: bool,
    image: str,
    command: tuple[str, ...],
    name,
    replicas,
    cpu,
    memory,
    env,
    ports,
    restart,
    constraints,
    spreads,
    dry_run,
) -> None:
    spec = from_flags(
        image,
        name=name,
        replicas=replicas,
        cpu=cpu,
        memory=memory,
        env=env,
        ports=ports,
        restart=restart,
        constraints=constraints,
        spreads=spreads,
        command=command,
    )
    if dry_run:
        await _dry_run(client, as_json, spec, replace=False)
        return
    reply = await client.call(
        "workloads.run", RunWorkload(spec, False, client.client_id, client.next_seq()), response=WorkloadReply
    )
    if as_json:
        emit_json(_reply_doc(reply))
    else:
        stdout.print(f"{reply.name}: version {reply.version} submitted ({spec.replicas} replica(s))")


@click.command(help="Create or update a workload from a YAML spec.")
@click.option("-f", "--file", "path", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True), required=True)
@click.option("--dry-run", is_flag=True, help="Validate and show where each replica would go; change nothing.")
@client_options
async def apply(client: ClusterClient, as_json: bool, path: Path, dry_run: bool) -> None:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}", field="file") from None
    spec = parse_yaml(text)
    if dry_run:
        await _dry_run(client, as_json, spec, replace=True)
        return
    reply = await client.call(
        "workloads.run", RunWorkload(spec, True, client.client_id, client.next_seq()), response=WorkloadReply
    )
    if as_json:
        emit_json(_reply_doc(reply))
    else:
        stdout.print(f"{reply.name}: version {reply.version} applied")


@click.command(help="List workloads.")
@client_read_options
async def ps(client: ClusterClient, out: OutputFormat) -> None:
    reply = await client.call("workloads.ps", PsRequest(), response=PsReply)
    if out.structured:
        out.emit_list(
            [
                {
                    "name": i.name,
                    "image": i.image,
                    "version": i.version,
                    "desired": i.desired,
                    "running": i.running,
                    "state": i.state,
                    "pending_reason": i.pending_reason,
                }
                for i in reply.items
            ]
        )
        return
    print_table(PS_COLUMNS, reply.items, wide=out.wide)
    for i in reply.items:
        if i.pending_reason:
            stdout.print(f"{i.name} pending: {i.pending_reason}", markup=False, highlight=False)


PS_COLUMNS = [
    Column("NAME", lambda i: i.name),
    Column("IMAGE", lambda i: i.image),
    Column("VERSION", lambda i: i.version),
    Column("RUNNING", lambda i: f"{i.running}/{i.desired}"),
    Column("STATE", lambda i: i.state),
]


def inspect_document(reply: InspectReply) -> dict:
    """What `inspect -o json|yaml` (and --json) prints. `apply -f` takes it back as it is
    (as kubectl's get -o yaml | apply): it reads `spec` and ignores the status beside it."""
    return {
        "name": reply.name,
        "state": reply.state,
        "spec": to_builtins(reply.spec),
        "stable_version": reply.stable_version,
        "failed_versions": reply.failed_versions,
        "allocations": [
            {
                "id": a.id,
                "node": a.node,
                "state": a.state,
                "exit_code": a.exit_code,
                "restarts": a.restarts,
                "replica": a.replica,
                "version": a.version,
                "desired": a.desired,
                "health": a.health,
                "message": a.message,
            }
            for a in reply.allocations
        ],
        "explanations": reply.explanations,
        "pending_reason": reply.pending_reason,
    }


@click.command(
    help="Show a workload: spec, allocations and placement explanations. "
    "`-o yaml` (or json) prints a document `apply -f` takes back unchanged."
)
@click.argument("name", callback=_name)
@client_read_options
async def inspect(client: ClusterClient, out: OutputFormat, name: str) -> None:
    reply = await client.call("workloads.inspect", WorkloadRef(name), response=InspectReply)
    if out.structured:
        out.emit(inspect_document(reply))
        return
    s = reply.spec
    stdout.print(f"[bold]{reply.name}[/bold]  version {s.version}  {reply.state}  image {s.image}", markup=True)
    stdout.print(
        f"command: {' '.join(s.command) or '(image default)'}   replicas: {s.replicas}", markup=False, highlight=False
    )
    table = Table("ID", "NODE", "REPLICA", "VERSION", "STATE", "DESIRED", "EXIT", "RESTARTS", "HEALTH")
    for a in reply.allocations:
        table.add_row(
            a.id,
            a.node,
            str(a.replica),
            str(a.version),
            a.state,
            a.desired,
            "-" if a.exit_code is None else str(a.exit_code),
            str(a.restarts),
            a.health or "-",
        )
    stdout.print(table)
    for a in reply.allocations:
        if a.message:
            stdout.print(f"{a.id}: {a.message}", markup=False, highlight=False)
    if reply.pending_reason:
        stdout.print(f"pending: {reply.pending_reason}", markup=False, highlight=False)
    if reply.explanations:
        stdout.print("placement:")
        for line in reply.explanations:
            stdout.print(f"  {line}", markup=False, highlight=False)


@click.command(help="Show a workload's logs, relayed through the cluster from the nodes running it.")
@click.argument("name", callback=_name)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--replica", type=click.IntRange(min=0), default=None, help="Only this replica.")
@click.option(
    "--tail",
    type=click.IntRange(0, 1_000_000),
    default=None,
    help="Only the last N lines per replica (0: none, only new ones with -f); default: all.",
)
@client_options
async def logs(
    client: ClusterClient, as_json: bool, name: str, follow: bool, replica: int | None, tail: int | None
) -> None:
    collected: list[dict] = []
    async with client.stream("workloads.logs", WorkloadLogs(name, replica, follow, tail), item=LogLine) as items:
        async for line in items:
            doc = {
                "allocation": line.allocation,
                "replica": line.replica,
                "stream": line.stream,
                "text": line.text,
                "ts": line.ts,
            }
            if as_json and not follow:
                collected.append(doc)
            elif as_json:
                print(json.dumps(doc), flush=True)  # one document per line when following
            else:
                prefix = f"[{line.replica}] " if replica is None else ""
                out = sys.stderr if line.stream == "stderr" else sys.stdout
                print(prefix + line.text, file=out, flush=True)
    if as_json and not follow:
        emit_list(collected)


JSON_EXEC_LIMIT = 16 * 1024 * 1024  # --json holds the output in memory; streaming has no limit


def _exec_target(target: str, replica: int | None) -> tuple[str, int | None]:
    """NAME or NAME/REPLICA (a replica index), and --replica, which must agree."""
    name, _, index = target.partition("/")
    name = _name(None, None, name)
    if index:
        if not index.isdigit() or len(index) > 6:
            raise click.BadParameter(f"{target!r}: expected NAME or NAME/REPLICA (a replica index)")
        if replica is not None and replica != int(index):
            raise click.BadParameter(f"{target!r} and --replica {replica} name different replicas")
        replica = int(index)
    return name, replica


def _terminal_size() -> tuple[int, int]:
    for fd in (1, 0, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return max(1, min(size.lines, 4096)), max(1, min(size.columns, 4096))
    return 24, 80


@click.command(
    "exec",
    help="Run a command inside a replica: cloudless exec [-i] [-t] NAME[/REPLICA] -- CMD... "
    "Output streams as it is produced; the exit code is the command's.",
)
@click.argument("target")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-i", "--interactive", is_flag=True, help="Pass this terminal's stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal (this one goes to raw mode).")
@click.option("--replica", type=click.IntRange(min=0), default=None, help="Replica index (default: the first).")
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 86_400),
    default=None,
    help="Kill the command after SECONDS (default: never).",
)
@client_options
async def exec_(
    client: ClusterClient,
    as_json: bool,
    target: str,
    command: tuple[str, ...],
    interactive: bool,
    tty: bool,
    replica: int | None,
    timeout: float | None,
) -> None:
    name, replica = _exec_target(target, replica)
    if as_json and (interactive or tty):
        raise InvalidInput("--json collects the output of a command without -i or -t")
    if tty and interactive and not os.isatty(0):
        raise InvalidInput("the input is not a terminal: drop -t, or run from a terminal")
    rows, cols = _terminal_size() if tty else (24, 80)
    request = WorkloadExec(name, tuple(command), replica, timeout, tty=tty, stdin=interactive, rows=rows, cols=cols)
    raw_terminal = termios.tcgetattr(0) if tty and interactive else None
    exit_code: int | None = None
    captured: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    async with client.duplex("workloads.exec", request, item=ExecEvent) as call:
        try:
            if raw_terminal is not None:
                tty_mode.setraw(0)
            async with _one_error(), trio.open_nursery() as nursery:
                if interactive:
                    nursery.start_soon(_send_stdin, call)
                else:
                    await call.end()
                if tty:
                    nursery.start_soon(_send_resizes, call)
                async for event in call:
                    if isinstance(event, ExecExit):
                        exit_code = event.exit_code
                    elif as_json:
                        captured[event.stream] += event.data
                        if len(captured["stdout"]) + len(captured["stderr"]) > JSON_EXEC_LIMIT:
                            raise InvalidInput(
                                f"output beyond {JSON_EXEC_LIMIT // 2**20} MiB: run without --json to stream it"
                            )
                    else:
                        out = sys.stderr.buffer if event.stream == "stderr" else sys.stdout.buffer
                        out.write(event.data)
                        out.flush()
                nursery.cancel_scope.cancel()
        finally:
            if raw_terminal is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, raw_terminal)
    if exit_code is None:
        raise Unavailable("the exec ended without the command's exit status")
    if as_json:
        emit_json(
            {
                "exit_code": exit_code,
                "stdout": captured["stdout"].decode("utf-8", "replace"),
                "stderr": captured["stderr"].decode("utf-8", "replace"),
            }
        )
    if exit_code != 0:
        raise SystemExit(exit_code if 0 < exit_code < 256 else 1)


@asynccontextmanager
async def _one_error():
    """The error of a task of the nursery inside, not the group trio wraps it in."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        raise next((e for e in leaves if isinstance(e, CloudlessError)), leaves[0]) from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


async def _send_stdin(call: DuplexStream[Any]) -> None:
    """Stdin to the command as it comes; its end as ExecStdinClose. A thread reads: making
    the shared stdin non-blocking would change it for the shell that started us too."""
    while data := await trio.to_thread.run_sync(os.read, 0, EXEC_CHUNK, abandon_on_cancel=True):
        await call.send(ExecStdin(data))
    await call.send(ExecStdinClose())
    await call.end()


async def _send_resizes(call: DuplexStream[Any]) -> None:
    with trio.open_signal_receiver(signal.SIGWINCH) as changes:
        async for _ in changes:
            rows, cols = _terminal_size()
            try:
                await call.send(ExecResize(rows, cols))
            except trio.ClosedResourceError:
                return  # input ended: the command is on its way out


@click.command(help="Stop every replica of a workload.")
@click.argument("name", callback=_name)
@client_options
async def stop(client: ClusterClient, as_json: bool, name: str) -> None:
    reply = await client.call(
        "workloads.stop", WorkloadRef(name, client.client_id, client.next_seq()), response=WorkloadReply
    )
    if as_json:
        emit_json({**_reply_doc(reply), "stopped": True})
    else:
        stdout.print(f"{name}: stopping")


@click.command(help="Change the number of replicas.")
@click.argument("name", callback=_name)
@click.argument("replicas", type=click.IntRange(0, 100_000))
@client_options
async def scale(client: ClusterClient, as_json: bool, name: str, replicas: int) -> None:
    reply = await client.call(
        "workloads.scale", ScaleRequest(name, replicas, client.client_id, client.next_seq()), response=WorkloadReply
    )
    if as_json:
        emit_json({**_reply_doc(reply), "replicas": replicas})
    else:
        stdout.print(f"{name}: scaling to {replicas}")


@click.command(help="Roll out a new version of a workload (per its update strategy).")
@click.argument("name", callback=_name)
@click.option("--image", required=True, help="The new image.")
@client_options
async def update(client: ClusterClient, as_json: bool, name: str, image: str) -> None:
    reply = await client.call(
        "workloads.update", UpdateRequest(name, image, client.client_id, client.next_seq()), response=WorkloadReply
    )
    if as_json:
        emit_json(_reply_doc(reply))
    else:
        stdout.print(f"{name}: version {reply.version} rolling out")


workload_commands = [run, ps, inspect, logs, exec_, stop, scale, update, apply]
