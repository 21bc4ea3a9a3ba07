"""`cloudless blob put|get|ls|rm` and `cloudless s3 keys create|ls|rm`, `cloudless s3 serve`.

They act on the local node's blob store (data dir: --data-dir, else
$CLOUDLESS_DATA_DIR, else ~/.cloudless/node) for now; through the cluster API
once the node serves it. Progress bars go to stderr, only on a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import click
import trio
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cloudless.blobs.errors import NoSuchKey
from cloudless.blobs.local import blobs_dir, open_local_blobs
from cloudless.blobs.manifest import ObjectManifest
from cloudless.blobs.objects import ObjectService
from cloudless.cli import output
from cloudless.errors import CloudlessError, InvalidInput

DEFAULT_DATA_DIR = "~/.cloudless/node"
DEFAULT_S3_ENDPOINT = "https://127.0.0.1:9443"
_BLOCK = 8 << 20


def _remember_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    ctx.meta["cloudless.blob.config"] = value
    return None


def _data_dir_option(f: Callable) -> Callable:
    f = click.option(
        "--config",
        "_config",
        envvar="CLOUDLESS_CONFIG",
        default=None,
        expose_value=False,
        callback=_remember_config,
        help="Client config: act on the cluster (default when set, unless --data-dir is given).",
    )(f)
    return click.option(
        "--data-dir",
        envvar="CLOUDLESS_DATA_DIR",
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help="Node data directory (blobs are kept in <data-dir>/blobs).",
    )(f)


def _cluster_config() -> str | None:
    """The client config to use: given (flag or $CLOUDLESS_CONFIG) and no --data-dir on the command line."""
    ctx = click.get_current_context()
    config = ctx.meta.get("cloudless.blob.config")
    if not config or ctx.get_parameter_source("data_dir") is click.core.ParameterSource.COMMANDLINE:
        return None
    return config


def _json_option(f: Callable) -> Callable:
    return output.json_option(f)


def _split(target: str, need_key: bool) -> tuple[str, str]:
    bucket, _, key = (target[5:] if target.startswith("s3://") else target.lstrip("/")).partition("/")
    if not bucket or (need_key and not key):
        raise InvalidInput(f"expected BUCKET/KEY, got {target!r}", field="target")
    return bucket, key


def _run(as_json: bool, data_dir: str, work: Callable[[ObjectService], object]) -> object:
    try:
        config = _cluster_config()
        if config is not None:
            from cloudless.api import client_config
            from cloudless.api.blobs import ClusterObjects

            return work(ClusterObjects(client_config.load(Path(config)).context(None)))  # type: ignore[arg-type]
        with open_local_blobs(Path(data_dir)) as service:
            return work(service)
    except CloudlessError as exc:
        output.fail(exc, as_json)
    except PermissionError as exc:
        output.fail(CloudlessError(f"permission denied: {exc.filename}"), as_json)
    except FileNotFoundError as exc:
        output.fail(InvalidInput(f"no such file: {exc.filename}", path=str(exc.filename)), as_json)
    return None  # unreachable: fail() exits


def _object_doc(m: ObjectManifest) -> dict:
    return {
        "bucket": m.bucket,
        "key": m.key,
        "size": m.size,
        "etag": m.etag,
        "content_type": m.content_type,
        "metadata": m.metadata,
        "chunks": len(m.chunks),
        "version": m.version,
        "last_modified": datetime.fromtimestamp(m.created, UTC).isoformat(),
    }


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


class _Bar:
    def __init__(self, enabled: bool, label: str, total: int | None) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=output.stderr,
            transient=True,
        )
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> _Bar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def advance(self, n: int) -> None:
        if self.enabled:
            self.progress.advance(self.task, n)


async def _read_stream(f, bar: _Bar) -> AsyncIterator[bytes]:  # type: ignore[no-untyped-def]
    while True:
        piece = await trio.to_thread.run_sync(f.read, _BLOCK)
        if not piece:
            return
        bar.advance(len(piece))
        yield piece


def _parse_meta(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise InvalidInput(f"--meta wants KEY=VALUE, got {pair!r}", field="meta")
        out[k.lower()] = v
    return out


@click.group(help="Store and fetch objects in the blob store.")
def blob() -> None:
    pass


@blob.command(help="Upload FILE (- for stdin) as BUCKET/KEY; the bucket is created if missing.")
@click.argument("file")
@click.argument("target")
@click.option("--content-type", default="binary/octet-stream", show_default=True)
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="User metadata (repeatable).")
@click.option("--replicas", type=click.IntRange(1, 16), help="Replica count for a bucket created by this put.")
@_data_dir_option
@_json_option
def put(
    file: str, target: str, content_type: str, meta: tuple[str, ...], replicas: int | None, data_dir: str, as_json: bool
) -> None:
    def work(service: ObjectService) -> ObjectManifest:
        bucket, key = _split(target, need_key=True)
        metadata = _parse_meta(meta)
        f = sys.stdin.buffer if file == "-" else open(file, "rb")
        total = None if file == "-" else os.fstat(f.fileno()).st_size

        async def main() -> ObjectManifest:
            try:
                await service.head_bucket(bucket)
            except CloudlessError as exc:
                if exc.code != "no_such_bucket":
                    raise
                await service.create_bucket(bucket, replicas=replicas)
            with _Bar(not as_json, f"put {key}", total) as bar:
                return await service.put_object(
                    bucket,
                    key,
                    _read_stream(f, bar),
                    content_type=content_type,
                    metadata=metadata,
                    expected_size=total,
                )

        try:
            return trio.run(main)
        finally:
            if f is not sys.stdin.buffer:
                f.close()

    m = _run(as_json, data_dir, work)
    assert isinstance(m, ObjectManifest)
    if as_json:
        output.emit_json({"object": _object_doc(m)})
        return
    output.stdout.print(f"stored {m.bucket}/{m.key} ({_human(m.size)}, {len(m.chunks)} chunks, etag {m.etag})")


@blob.command(help="Download BUCKET/KEY to FILE (default: the key's base name; - for stdout).")
@click.argument("target")
@click.argument("file", required=False)
@_data_dir_option
@_json_option
def get(target: str, file: str | None, data_dir: str, as_json: bool) -> None:
    def work(service: ObjectService) -> tuple[ObjectManifest, str]:
        bucket, key = _split(target, need_key=True)
        dest = file or os.path.basename(key) or "object"
        if dest == "-" and as_json:
            raise InvalidInput("--json prints the result on stdout: give a FILE to write the object to")

        async def main() -> ObjectManifest:
            manifest = await service.head_object(bucket, key)
            if dest == "-":
                out = sys.stdout.buffer
            else:
                tmp = Path(dest).with_name(f".{Path(dest).name}.part")
                out = open(tmp, "wb")
            try:
                with _Bar(not as_json and dest != "-", f"get {key}", manifest.size) as bar:

                    async def write(piece: bytes) -> None:
                        await trio.to_thread.run_sync(out.write, piece)
                        bar.advance(len(piece))

                    await service.copy_range(manifest, write)
            except BaseException:
                if dest != "-":
                    out.close()
                    tmp.unlink(missing_ok=True)
                raise
            if dest == "-":
                out.flush()
            else:
                out.close()
                os.replace(tmp, dest)
            return manifest

        return trio.run(main), dest

    result = _run(as_json, data_dir, work)
    assert isinstance(result, tuple)
    m, dest = result
    if as_json:
        output.emit_json({"object": _object_doc(m), "file": os.path.abspath(dest)})
    elif dest != "-":
        output.stdout.print(f"wrote {dest} ({_human(m.size)})")


@blob.command("ls", help="List buckets, or the objects of BUCKET[/PREFIX].")
@click.argument("target", required=False)
@click.option("--recursive", "-r", is_flag=True, help="List every key under the prefix, not one level.")
@_data_dir_option
@output.output_options
def ls(target: str | None, recursive: bool, data_dir: str, out: output.OutputFormat) -> None:
    def work(service: ObjectService) -> dict:
        async def main() -> dict:
            if not target:
                buckets = await service.list_buckets()
                return output.list_document(
                    [
                        {
                            "name": b.name,
                            "created": datetime.fromtimestamp(b.created, UTC).isoformat(),
                            "replicas": b.replicas,
                        }
                        for b in buckets
                    ]
                )
            bucket, prefix = _split(target, need_key=False)
            objects, prefixes, marker = [], [], ""
            while True:
                page = await service.list_objects(bucket, prefix, "" if recursive else "/", marker, 1000)
                objects.extend(_object_doc(m) for m in page.objects)
                prefixes.extend(page.prefixes)
                if not page.truncated or page.next_marker is None:
                    break
                marker = page.next_marker
            return output.list_document(objects, bucket=bucket, prefix=prefix, prefixes=prefixes)

        return trio.run(main)

    doc = _run(out.json, data_dir, work)
    assert isinstance(doc, dict)
    if out.structured:
        out.emit(doc)
        return
    if not target:
        output.print_table(_BUCKET_COLUMNS, doc["items"], wide=out.wide)
        return
    rows = [{"key": p} for p in doc["prefixes"]] + doc["items"]
    output.print_table(_OBJECT_COLUMNS, rows, wide=out.wide)


_BUCKET_COLUMNS = [
    output.Column("BUCKET", lambda b: b["name"]),
    output.Column("CREATED", lambda b: b["created"][:19]),
    output.Column("REPLICAS", lambda b: b["replicas"]),
]
_OBJECT_COLUMNS = [  # a common prefix is a row with only its key
    output.Column("KEY", lambda o: o["key"]),
    output.Column("SIZE", lambda o: _human(o["size"]) if "size" in o else None),
    output.Column("MODIFIED", lambda o: o.get("last_modified", "")[:19]),
    output.Column("ETAG", lambda o: o.get("etag")),
    output.Column("CHUNKS", lambda o: o.get("chunks"), wide_only=True),
    output.Column("CONTENT-TYPE", lambda o: o.get("content_type"), wide_only=True),
]


@blob.command("rm", help="Delete BUCKET/KEY (exit 3 if it does not exist).")
@click.argument("target")
@_data_dir_option
@_json_option
def rm(target: str, data_dir: str, as_json: bool) -> None:
    def work(service: ObjectService) -> dict:
        bucket, key = _split(target, need_key=True)

        async def main() -> dict:
            if not await service.delete_object(bucket, key):
                raise NoSuchKey(f"no object {bucket}/{key}", bucket=bucket, key=key)
            return {"deleted": {"bucket": bucket, "key": key}}

        return trio.run(main)

    doc = _run(as_json, data_dir, work)
    assert isinstance(doc, dict)
    if as_json:
        output.emit_json(doc)
    else:
        output.stdout.print(f"deleted {target}")


# s3 -----------------------------------------------------------------------------


@click.group(help="The S3-compatible gateway: access keys, and serving it from this data dir.")
def s3() -> None:
    pass


@s3.group(help="S3 access keys.")
def keys() -> None:
    pass


def _keys_create_in_cluster(config: str, description: str, as_json: bool) -> dict:
    """The key is stored through Raft by the node the client config reaches."""
    from cloudless.api import client_config
    from cloudless.api.blobs import S3KeyCreate, S3KeyReply
    from cloudless.api.client import ClusterClient

    async def main() -> S3KeyReply:
        context = client_config.load(Path(config)).context(None)
        client = ClusterClient(context)
        try:
            return await client.call("blobs.keys.create", S3KeyCreate(description), response=S3KeyReply)
        finally:
            await client.aclose()

    try:
        reply = trio.run(main)
    except CloudlessError as exc:
        output.fail(exc, as_json)
    return {"endpoint": reply.endpoint, "access_key": reply.access_key, "secret_key": reply.secret_key}


@keys.command(
    "create",
    help="Issue an access key; the secret is shown once. With --config (or "
    "$CLOUDLESS_CONFIG) the cluster issues it; otherwise the local data dir's store does.",
)
@click.option(
    "--endpoint",
    envvar="CLOUDLESS_S3_ENDPOINT",
    default=None,
    help=f"The gateway URL to report (default: the cluster's gateway, or {DEFAULT_S3_ENDPOINT} locally).",
)
@click.option("--description", default="")
@_data_dir_option
@_json_option
def keys_create(endpoint: str | None, description: str, data_dir: str, as_json: bool) -> None:
    config_path = _cluster_config()
    if config_path:
        doc = _keys_create_in_cluster(config_path, description, as_json)
        if endpoint:
            doc["endpoint"] = endpoint
    else:
        key = _run(
            as_json, data_dir, lambda service: trio.run(lambda: service.create_access_key(description=description))
        )
        doc = {"endpoint": endpoint or DEFAULT_S3_ENDPOINT, "access_key": key.access_key, "secret_key": key.secret_key}  # type: ignore[union-attr]
    if as_json:
        output.emit_json(doc)
        return
    output.stdout.print(
        f"endpoint:   {doc['endpoint']}\naccess key: {doc['access_key']}\nsecret key: {doc['secret_key']}"
    )


@keys.command("ls", help="List access keys (not their secrets).")
@_data_dir_option
@output.output_options
def keys_ls(data_dir: str, out: output.OutputFormat) -> None:
    found = _run(out.json, data_dir, lambda service: trio.run(service.metadata.list_access_keys))
    docs = [
        {
            "access_key": k.access_key,
            "owner": k.owner,
            "description": k.description,
            "created": datetime.fromtimestamp(k.created, UTC).isoformat(),
        }
        for k in found
    ]  # type: ignore[union-attr]
    if out.structured:
        out.emit_list(docs)
        return
    output.print_table(_KEY_COLUMNS, docs, wide=out.wide)


_KEY_COLUMNS = [
    output.Column("ACCESS KEY", lambda d: d["access_key"]),
    output.Column("CREATED", lambda d: d["created"][:19]),
    output.Column("OWNER", lambda d: d["owner"], wide_only=True),
    output.Column("DESCRIPTION", lambda d: d["description"]),
]


@keys.command("rm", help="Revoke an access key.")
@click.argument("access_key")
@_data_dir_option
@_json_option
def keys_rm(access_key: str, data_dir: str, as_json: bool) -> None:
    _run(as_json, data_dir, lambda service: trio.run(service.metadata.delete_access_key, access_key))
    if as_json:
        output.emit_json({"revoked": access_key})
    else:
        output.stdout.print(f"revoked {access_key}")


@s3.command("serve", help="Serve the S3 gateway over TLS from this data dir (until interrupted).")
@click.option("--listen", default="127.0.0.1:9443", show_default=True, metavar="HOST:PORT")
@_data_dir_option
def serve(listen: str, data_dir: str) -> None:
    from cloudless.blobs.s3.app import S3Gateway
    from cloudless.blobs.s3.server import gateway_tls_files, serve_gateway

    host, _, port = listen.rpartition(":")
    try:
        cert, key, ca = gateway_tls_files(blobs_dir(Path(data_dir)) / "gateway", [host or "127.0.0.1", "localhost"])
        with open_local_blobs(Path(data_dir)) as service:
            app = S3Gateway(service)

            async def main() -> None:
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        lambda task_status: serve_gateway(
                            app,
                            host=host or "127.0.0.1",
                            port=int(port),
                            certfile=cert,
                            keyfile=key,
                            task_status=task_status,
                        )
                    )
                    output.stderr.print(f"S3 gateway on https://{listen} (CA certificate: {ca})")

            trio.run(main)
    except CloudlessError as exc:
        output.fail(exc, False)
    except KeyboardInterrupt:
        pass
