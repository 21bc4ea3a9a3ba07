"""A node's data directory: who it is, its credentials, its Raft log, logs.

    <data-dir>/
      node.json          identity and cluster, format version (written last at
                         bootstrap/join, so its presence means "enrolled")
      tls/               this node's credentials (cloudless.pki.credentials)
      raft/              RocksDB: Raft log and metadata
      logs/node.log      structured logs (JSON lines)
      admin.yaml         client config for the admin (bootstrap node only)
      node.pid           written by `cloudless dev up`

Restarting with the same data dir resumes the same node.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudless.durable import write_atomic
from cloudless.errors import CloudlessError, InvalidInput

FORMAT_VERSION = 1


class DataDirError(CloudlessError):
    pass


@dataclass(frozen=True)
class NodeRecordFile:
    node_id: str
    cluster_id: str
    advertise: str
    format_version: int = FORMAT_VERSION


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def raft(self) -> Path:
        return self.root / "raft"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def admin_config(self) -> Path:
        return self.root / "admin.yaml"

    @property
    def record_path(self) -> Path:
        return self.root / "node.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def create(self) -> None:
        for d in (self.root, self.tls, self.logs, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def is_enrolled(self) -> bool:
        return self.record_path.exists()

    def load_record(self) -> NodeRecordFile:
        try:
            raw = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            raise DataDirError(f"{self.root} holds no node (no node.json)") from None
        except (OSError, ValueError) as exc:
            raise DataDirError(f"{self.record_path}: unreadable: {exc}") from None
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataDirError(f"{self.record_path}: unsupported format version {raw.get('format_version')!r}")
        try:
            return NodeRecordFile(**raw)
        except TypeError as exc:
            raise DataDirError(f"{self.record_path}: {exc}") from None

    def save_record(self, record: NodeRecordFile) -> None:
        write_atomic(self.record_path, json.dumps(asdict(record), indent=2).encode())


def new_node_id(hostname: str | None = None) -> str:
    """A readable, unique node id: the host name's safe part plus a random suffix."""
    base = "".join(ch for ch in (hostname or os.uname().nodename).lower() if ch.isalnum() or ch == "-")[:40]
    base = base.strip("-") or "node"
    return f"{base}-{secrets.token_hex(3)}"


def validate_node_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
        raise InvalidInput(f"invalid node name {name!r}: lowercase letters, digits, . _ - (max 63)", field="name")
    return name
