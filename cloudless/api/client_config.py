"""Client configuration, kubectl style: named contexts, one current.

Found at `--config FILE`, else `$CLOUDLESS_CONFIG`, else
`~/.cloudless/config.yaml`. Each context names a cluster, the endpoints to
try (the client fails over across them), the cluster CA it pins, and the
client's own certificate and key (PEM, inline).

    current-context: dev
    contexts:
      - name: dev
        cluster-id: c-1a2b3c
        endpoints: ["127.0.0.1:7001", "127.0.0.1:7002"]
        ca: |
          -----BEGIN CERTIFICATE-----...
        certificate: |
          ...
        key: |
          ...
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cloudless.durable import write_atomic
from cloudless.errors import Conflict, InvalidInput, NotFound, Unavailable

CONFIG_VERSION = 1
_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")
_CONTEXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$")


class ConfigError(InvalidInput):
    pass


@dataclass
class Context:
    name: str
    cluster_id: str
    endpoints: list[str]
    ca_pem: bytes
    certificate_pem: bytes
    key_pem: bytes


@dataclass
class ClientConfig:
    contexts: dict[str, Context] = field(default_factory=dict)
    current_context: str = ""
    path: Path | None = None

    def context(self, name: str | None = None) -> Context:
        wanted = name or self.current_context
        if not wanted:
            raise ConfigError(f"{self.path}: no current-context set")
        try:
            return self.contexts[wanted]
        except KeyError:
            raise NotFound(f"{self.path}: no context named {wanted!r}") from None

    def use(self, name: str) -> None:
        self.context(name)  # NotFound if there is none
        self.current_context = name

    def rename(self, old: str, new: str) -> None:
        """Rename a context (and current-context with it); NotFound, InvalidInput or Conflict change nothing."""
        ctx = self.context(old)
        check_context_name(new)
        if new == old:
            return
        if new in self.contexts:
            raise Conflict(f"{self.path}: a context named {new!r} exists already", context=new)
        # Rebuild to keep the file's order with the renamed entry in place.
        self.contexts = {(new if k == old else k): v for k, v in self.contexts.items()}
        ctx.name = new
        if self.current_context == old:
            self.current_context = new

    def free_name(self, wanted: str) -> str:
        """`wanted`, or `wanted-2`, `wanted-3`... whichever is not taken."""
        name, n = wanted, 1
        while name in self.contexts:
            n += 1
            name = f"{wanted[:58]}-{n}"
        return name

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            {
                "version": CONFIG_VERSION,
                "current-context": self.current_context,
                "contexts": [
                    {
                        "name": c.name,
                        "cluster-id": c.cluster_id,
                        "endpoints": list(c.endpoints),
                        "ca": c.ca_pem.decode(),
                        "certificate": c.certificate_pem.decode(),
                        "key": c.key_pem.decode(),
                    }
                    for c in self.contexts.values()
                ],
            },
            sort_keys=False,
        )

    def save(self, path: Path) -> None:
        """Write atomically with mode 0600: the file holds a private key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self.to_yaml().encode())
        self.path = path


def parse_endpoint(text: str) -> tuple[str, int]:
    m = _ENDPOINT.match(text.strip())
    if not m or not (0 < int(m.group(2)) < 65536):
        raise ConfigError(f"invalid endpoint {text!r}: expected HOST:PORT", field="endpoint")
    host = m.group(1).strip("[]")
    return host, int(m.group(2))


def check_context_name(name: str) -> str:
    if not _CONTEXT_NAME.match(name):
        raise ConfigError(
            f"invalid context name {name!r}: 1-63 letters, digits and . _ @ -, starting with a letter or digit",
            field="name",
        )
    return name


def default_path() -> Path:
    env = os.environ.get("CLOUDLESS_CONFIG")
    if env:
        return Path(env)
    return Path.home() / ".cloudless" / "config.yaml"


def load(path: Path | None = None) -> ClientConfig:
    path = Path(path) if path else default_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise NotFound(
            f"no client config at {path}: pass --config, set CLOUDLESS_CONFIG, "
            "or start a cluster (`cloudless dev up`) to get one"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if raw.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        raise ConfigError(f"{path}: unsupported config version {raw.get('version')!r}")
    config = ClientConfig(current_context=str(raw.get("current-context") or ""), path=path)
    contexts = raw.get("contexts") or []
    if not isinstance(contexts, list):
        raise ConfigError(f"{path}: contexts must be a list")
    for i, item in enumerate(contexts):
        where = f"{path}: contexts[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping")
        try:
            name = str(item["name"])
            endpoints = [str(e) for e in item["endpoints"]]
            ctx = Context(
                name=name,
                cluster_id=str(item["cluster-id"]),
                endpoints=endpoints,
                ca_pem=str(item["ca"]).encode(),
                certificate_pem=str(item["certificate"]).encode(),
                key_pem=str(item["key"]).encode(),
            )
        except KeyError as exc:
            raise ConfigError(f"{where}: missing field {exc.args[0]!r}") from None
        except TypeError:
            raise ConfigError(f"{where}: endpoints must be a list") from None
        if not endpoints:
            raise ConfigError(f"{where}: endpoints is empty")
        for e in endpoints:
            parse_endpoint(e)
        config.contexts[name] = ctx
    return config


@contextlib.contextmanager
def editing(path: Path | None = None, *, create: bool = False) -> Iterator[ClientConfig]:
    """Load, let the caller change, and save atomically, one editor at a time.

    An exclusive lock on a file beside the config serialises editors (two
    `context use`, or a node merging its context while the user switches),
    so no edit is lost. If the body raises, the file is left as it was.
    With `create`, a missing file starts as an empty config.
    """
    path = Path(path) if path else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _lock(lock, path)
        if create and not path.exists():
            config = ClientConfig(path=path)
        else:
            config = load(path)
        yield config
        config.save(path)
    finally:
        os.close(lock)


LOCK_WAIT_S = 10.0


def _lock(fd: int, path: Path) -> None:
    """An exclusive flock, waiting a bounded time: a stuck editor must not hang a starting node."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise Unavailable(f"{path} is locked by another editor (for over {LOCK_WAIT_S:.0f}s)") from None
            time.sleep(0.05)


@dataclass(frozen=True)
class Merged:
    """What `merge_context` did."""

    path: Path
    name: str  # the name the context got (its own, or a free variant of it)
    created_file: bool
    made_current: bool  # this merge switched current-context to it
    is_current: bool
    already_present: bool  # the same context (cluster and credentials) was there: nothing changed


def merge_context(
    path: Path | None, context: Context, *, make_current: bool = False, exact_name: bool = False
) -> Merged:
    """Add `context` to the client config at `path`, never replacing anything.

    A context of the same name that is not this one is kept: this one gets a
    free name (`name-2`...), or with `exact_name` the merge is refused
    (Conflict). It becomes the current context if asked, or if the config
    has none, so a user's current cluster never changes under them unasked.
    """
    path = Path(path) if path else default_path()
    created = not path.exists()
    check_context_name(context.name)
    with editing(path, create=True) as config:
        same = [
            c
            for c in config.contexts.values()
            if (c.cluster_id, c.certificate_pem) == (context.cluster_id, context.certificate_pem)
        ]
        if same:
            name, present = same[0].name, True
        elif exact_name and context.name in config.contexts:
            raise Conflict(f"{path}: a context named {context.name!r} exists already", context=context.name)
        else:
            name, present = config.free_name(context.name), False
            config.contexts[name] = Context(
                name,
                context.cluster_id,
                list(context.endpoints),
                context.ca_pem,
                context.certificate_pem,
                context.key_pem,
            )
        made_current = config.current_context != name and (
            make_current or not config.current_context or config.current_context not in config.contexts
        )
        if made_current:
            config.current_context = name
        is_current = config.current_context == name
    return Merged(path, name, created, made_current, is_current, present)
