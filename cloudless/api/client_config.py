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

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cloudless.durable import write_atomic
from cloudless.errors import InvalidInput, NotFound

CONFIG_VERSION = 1
_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


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
