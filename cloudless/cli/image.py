"""`cloudless image import|pull|ls|rm|prune`.

`import`, `pull` and `ls` act on the cluster when a client config is at hand
(--config, $CLOUDLESS_CONFIG, or ~/.cloudless/config.yaml) and no data dir is
named: the image is published to the cluster's blob store, where every node
finds it. With --data-dir (or $CLOUDLESS_DATA_DIR) they act on that node's
local store, `<data dir>/images`, as `rm` and `prune` always do.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import click
import trio
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cloudless.cli import output
from cloudless.errors import CloudlessError
from cloudless.sandbox.images import ImageRecord, ImageStore, ProgressEvent

DEFAULT_DATA_DIR = "~/.cloudless/node"


def _data_dir_option(f: Callable) -> Callable:
    return click.option(
        "--data-dir",
        envvar="CLOUDLESS_DATA_DIR",
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help="Node data directory (images are kept in <data-dir>/images).",
    )(f)


def _remember_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    ctx.meta["cloudless.image.config"] = value


def _target_options(f: Callable) -> Callable:
    """--config and --data-dir: the cluster, or one node's local store."""
    f = click.option(
        "--config",
        "_config",
        type=click.Path(path_type=Path),
        default=None,
        expose_value=False,
        callback=_remember_config,
        help="Client config: act on the cluster (the default when a config exists and no --data-dir is given).",
    )(f)
    return _data_dir_option(f)


def _cluster_context():  # type: ignore[no-untyped-def]
    """The client context to act on, or None for the local store: a data dir
    named on the command line or in $CLOUDLESS_DATA_DIR wins; then a client
    config given or found at its default path."""
    from cloudless.api import client_config

    ctx = click.get_current_context()
    if ctx.get_parameter_source("data_dir") in (
        click.core.ParameterSource.COMMANDLINE,
        click.core.ParameterSource.ENVIRONMENT,
    ):
        return None
    given = ctx.meta.get("cloudless.image.config")
    if given is None and not client_config.default_path().exists():
        return None
    return client_config.load(given).context(None)


def _target(as_json: bool):  # type: ignore[no-untyped-def]
    """`_cluster_context()` with a bad config reported as the command's error."""
    from cloudless.api.client_config import Context

    context = _run(as_json, _cluster_context)
    assert context is None or isinstance(context, Context)
    return context


def _published_doc(image) -> dict:  # type: ignore[no-untyped-def]
    return {
        "name": image.name,
        "id": image.id,
        "manifest_digest": image.manifest_digest,
        "size": image.size,
        "layers": image.layers,
        "publisher": image.publisher,
        "created_at": image.created,
    }


def _name_row(name: str) -> tuple[str, str]:
    repo, _, tag = name.rpartition(":")
    return (repo, tag) if repo and "/" not in tag else (name, "")


def _json_option(f: Callable) -> Callable:
    return output.json_option(f)


def _store(data_dir: str) -> ImageStore:
    try:
        return ImageStore(Path(os.path.expanduser(data_dir)) / "images")
    except PermissionError as exc:
        raise CloudlessError(f"cannot use data dir {data_dir}: {exc.strerror}", path=str(exc.filename)) from None


def _record_doc(rec: ImageRecord) -> dict:
    return {
        "id": rec.id,
        "names": rec.names,
        "manifest_digest": rec.manifest_digest,
        "repository_digests": rec.repository_digests,
        "size": rec.size,
        "layers": [{"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size} for layer in rec.layers],
        "created_at": rec.created_at,
        "config": {
            "entrypoint": rec.config.entrypoint,
            "cmd": rec.config.cmd,
            "env": rec.config.env,
            "working_dir": rec.config.working_dir,
            "user": rec.config.user,
            "exposed_ports": rec.config.exposed_ports,
        },
    }


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f}TB"


class _ProgressBars:
    """Maps store progress events (from any thread) onto rich progress bars."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=output.stderr,
            transient=True,
        )
        self._tasks: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> _ProgressBars:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def __call__(self, ev: ProgressEvent) -> None:
        if not self.enabled:
            return
        key = (ev.phase, ev.item)
        with self._lock:
            task = self._tasks.get(key)
            if task is None:
                label = ev.item.split(":", 1)[-1][:12]
                task = self.progress.add_task(f"{ev.phase} {label}", total=ev.total)
                self._tasks[key] = task
        self.progress.update(task, completed=ev.done, total=ev.total)


def _run(as_json: bool, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except CloudlessError as exc:
        output.fail(exc, as_json)
    except PermissionError as exc:
        output.fail(CloudlessError(f"permission denied: {exc.filename}"), as_json)
    return None  # unreachable: fail() exits


@click.group(help="Manage container images: the cluster's (with a client config) or one node's (--data-dir).")
def image() -> None:
    pass


@image.command("import", help="Import an OCI image layout (directory or tar) or a `docker save` tarball.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Tag the imported image with this reference.")
@_target_options
@_json_option
def import_(path: Path, name: str | None, data_dir: str, as_json: bool) -> None:
    context = _target(as_json)
    if context is not None:
        from cloudless.api.images import import_to_cluster

        def to_cluster() -> list:
            with _ProgressBars(not as_json) as bars:
                return trio.run(lambda: import_to_cluster(context, path, name=name, progress=bars))

        images = _run(as_json, to_cluster)
        assert isinstance(images, list)
        if as_json:
            output.emit_list([_published_doc(i) for i in images])
            return
        for i in images:
            output.stdout.print(f"imported {i.name} ({i.id.split(':', 1)[1][:12]}) into the cluster", markup=False)
        return

    def work() -> list[ImageRecord]:
        store = _store(data_dir)
        with _ProgressBars(not as_json) as bars:
            return store.import_path(path, name=name, progress=bars)

    records = _run(as_json, work)
    assert isinstance(records, list)
    if as_json:
        output.emit_list([_record_doc(r) for r in records])
        return
    for r in records:
        output.stdout.print(f"imported {', '.join(r.names) or '<untagged>'} ({r.short_id})")


@image.command(help="Pull an image from a registry.")
@click.argument("reference")
@click.option(
    "--insecure-registry",
    "insecure",
    multiple=True,
    metavar="HOST:PORT",
    help="Use plain HTTP for this registry (repeatable). Only for registries you trust, e.g. on loopback.",
)
@click.option("--username", envvar="CLOUDLESS_REGISTRY_USERNAME", help="Registry user name.")
@click.option("--password", envvar="CLOUDLESS_REGISTRY_PASSWORD", help="Registry password (prefer the env var).")
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 600),
    default=30.0,
    show_default=True,
    help="Per-request timeout in seconds.",
)
@_target_options
@_json_option
def pull(
    reference: str,
    insecure: tuple[str, ...],
    username: str | None,
    password: str | None,
    timeout: float,
    data_dir: str,
    as_json: bool,
) -> None:
    from cloudless.sandbox.reference import parse_reference
    from cloudless.sandbox.registry import RegistryClient

    context = _target(as_json)
    if context is not None:
        from cloudless.api.client import ClusterClient
        from cloudless.api.images import ImagePullReply, ImagePullRequest

        def on_a_node() -> ImagePullReply:
            parse_reference(reference)  # a bad reference fails here, before any node is asked
            request = ImagePullRequest(reference, tuple(insecure), username or "", password or "", timeout)

            async def main() -> ImagePullReply:
                client = ClusterClient(context)
                try:
                    # A pull takes many registry requests; each gets `timeout`.
                    return await client.call("images.pull", request, response=ImagePullReply, timeout=600)
                finally:
                    await client.aclose()

            return trio.run(main)

        reply = _run(as_json, on_a_node)
        assert reply is not None
        if as_json:
            output.emit_json({"image": _published_doc(reply.image), "node": reply.node})  # type: ignore[attr-defined]
            return
        image = reply.image  # type: ignore[attr-defined]
        output.stdout.print(
            f"pulled {image.name} ({image.id.split(':', 1)[1][:12]}) into the cluster through {reply.node}",  # type: ignore[attr-defined]
            markup=False,
        )
        return

    def work() -> ImageRecord:
        ref = parse_reference(reference)
        store = _store(data_dir)
        creds = {ref.registry: (username, password or "")} if username else {}

        async def main() -> ImageRecord:
            async with RegistryClient(store, insecure_registries=insecure, credentials=creds, timeout=timeout) as c:
                return await c.pull(ref, progress=bars)

        with _ProgressBars(not as_json) as bars:
            return trio.run(main)

    rec = _run(as_json, work)
    assert isinstance(rec, ImageRecord)
    if as_json:
        output.emit_json({"image": _record_doc(rec)})
        return
    output.stdout.print(f"pulled {', '.join(rec.names) or reference} ({rec.short_id})")
    for d in rec.repository_digests:
        output.stdout.print(f"digest: {d}")


@image.command("ls", help="List the cluster's images (or one node's, with --data-dir).")
@_target_options
@output.output_options
def ls(data_dir: str, out: output.OutputFormat) -> None:
    context = _target(out.json)
    if context is not None:
        from cloudless.api.client import ClusterClient
        from cloudless.api.images import ImageListReply

        async def main() -> ImageListReply:
            client = ClusterClient(context)
            try:
                return await client.call("images.list", b"", response=ImageListReply, timeout=60)
            finally:
                await client.aclose()

        reply = _run(out.json, lambda: trio.run(main))
        assert reply is not None
        if out.structured:
            out.emit_list([_published_doc(i) for i in reply.images], truncated=reply.truncated)  # type: ignore[attr-defined]
            return
        output.print_table(_CLUSTER_IMAGE_COLUMNS, reply.images, wide=out.wide)  # type: ignore[attr-defined]
        return
    records = _run(out.json, lambda: _store(data_dir).list())
    assert isinstance(records, list)
    if out.structured:
        out.emit_list([_record_doc(r) for r in records])
        return
    rows = [(r, *n.rsplit(":", 1)) for r in records for n in r.names or ["<none>:<none>"]]
    output.print_table(_IMAGE_COLUMNS, rows, wide=out.wide)


_CLUSTER_IMAGE_COLUMNS = [  # rows are PublishedImage
    output.Column("REPOSITORY", lambda i: _name_row(i.name)[0]),
    output.Column("TAG", lambda i: _name_row(i.name)[1]),
    output.Column("IMAGE ID", lambda i: i.id.split(":", 1)[1][:12]),
    output.Column("DIGEST", lambda i: i.id, wide_only=True),
    output.Column("SIZE", lambda i: _human(i.size)),
    output.Column("PUBLISHED BY", lambda i: i.publisher),
]

_IMAGE_COLUMNS = [  # rows are (record, repository, tag)
    output.Column("REPOSITORY", lambda row: row[1]),
    output.Column("TAG", lambda row: row[2]),
    output.Column("IMAGE ID", lambda row: row[0].short_id),
    output.Column("DIGEST", lambda row: row[0].id, wide_only=True),
    output.Column("SIZE", lambda row: _human(row[0].size)),
]


@image.command("rm", help="Remove an image name from a node's local store (and the image once it has no names left).")
@click.argument("reference")
@click.option("--force", is_flag=True, help="Remove even if a container root still uses it.")
@_data_dir_option
@_json_option
def rm(reference: str, force: bool, data_dir: str, as_json: bool) -> None:
    def work() -> dict:
        store = _store(data_dir)
        rec = store.remove(reference, force=force)
        freed = store.gc(prune_untagged=False)
        return {"removed": rec.id, "freed_bytes": freed.freed_bytes}

    doc = _run(as_json, work)
    assert isinstance(doc, dict)
    if as_json:
        output.emit_json(doc)
        return
    output.stdout.print(
        f"removed {reference} ({doc['removed'].split(':', 1)[1][:12]}), freed {_human(doc['freed_bytes'])}"
    )


@image.command(help="Delete untagged images and blobs/layers nothing references.")
@_data_dir_option
@_json_option
def prune(data_dir: str, as_json: bool) -> None:
    result = _run(as_json, lambda: _store(data_dir).gc())
    doc = {
        "removed_images": result.removed_images,  # type: ignore[union-attr]
        "removed_blobs": result.removed_blobs,  # type: ignore[union-attr]
        "removed_layers": result.removed_layers,  # type: ignore[union-attr]
        "freed_bytes": result.freed_bytes,  # type: ignore[union-attr]
    }
    if as_json:
        output.emit_json(doc)
        return
    output.stdout.print(f"freed {_human(doc['freed_bytes'])}")
