"""Rootless runc: what an unprivileged node can do, and the host facts its config needs.

A node that is not root runs containers with `runc --rootless true` inside a
user namespace where its own uid/gid is 0. Three host facts shape the config:

- id mappings: the user's subordinate ranges from /etc/subuid and /etc/subgid
  when newuidmap/newgidmap exist (runc calls them), so an image's non-root
  users have ids; otherwise a single mapping (the user as 0), and only uid 0
  can run inside.
- a delegated cgroup v2 subtree: runc puts a relative cgroups path under the
  parent of the node's own cgroup; when that directory and its
  cgroup.subtree_control are writable by the user (systemd `Delegate=yes`),
  the memory/cpu/pids controllers it offers are enforced there. Otherwise a
  rootless container has no limits at all, and the scheduler says so.
- no bridge (it needs root): a container gets its own network namespace with
  loopback only, or the host's; the scheduler refuses specs with ports.

Parsing is pure (texts and paths in, facts out) so it is unit-tested without a
second user; `detect_host` reads the real files and tries a user namespace.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cloudless.sandbox.network import Attachment
from cloudless.sandbox.runtime import PortMapping, SandboxError

# Controllers a delegated subtree can enforce, in the order they are reported.
LIMIT_CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "pids")
_MAX_ID = (1 << 32) - 2


@dataclass(frozen=True, slots=True)
class IdMapping:
    container_id: int
    host_id: int
    size: int

    def as_oci(self) -> dict[str, int]:
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}


@dataclass(frozen=True, slots=True)
class RootlessHost:
    """What the config builder needs to run containers as this user."""

    uid_mappings: tuple[IdMapping, ...]
    gid_mappings: tuple[IdMapping, ...]
    # Absolute path of the delegated cgroup v2 directory (under /sys/fs/cgroup), or None.
    cgroup: str | None = None
    limits: frozenset[str] = frozenset()  # the subset of LIMIT_CONTROLLERS enforced there

    @property
    def subordinate(self) -> bool:
        return len(self.uid_mappings) > 1

    def maps_uid(self, uid: int) -> bool:
        return any(m.container_id <= uid < m.container_id + m.size for m in self.uid_mappings)

    def maps_gid(self, gid: int) -> bool:
        return any(m.container_id <= gid < m.container_id + m.size for m in self.gid_mappings)

    def unenforced(self) -> list[str]:
        """Limits a container on this node goes without (what `inspect` reports)."""
        return [c for c in LIMIT_CONTROLLERS if c not in self.limits]


def subordinate_range(text: str, name: str, uid: int) -> tuple[int, int] | None:
    """(start, count) of the first /etc/subuid (or subgid) entry for `name` or `uid`."""
    for line in text.splitlines()[:10_000]:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (name, str(uid)):
            continue
        start, count = fields[1], fields[2]
        if start.isdigit() and count.isdigit() and 0 < int(count) and int(start) + int(count) <= _MAX_ID:
            return int(start), int(count)
    return None


def id_mappings(own: int, subordinate: tuple[int, int] | None) -> tuple[IdMapping, ...]:
    """The user as 0 inside, then its subordinate range from 1 up (as podman maps)."""
    mappings = [IdMapping(0, own, 1)]
    if subordinate is not None:
        start, count = subordinate
        mappings.append(IdMapping(1, start, min(count, 65536)))
    return tuple(mappings)


def delegated_cgroup(
    proc_self_cgroup: str, root: Path = Path("/sys/fs/cgroup"), writable=os.access
) -> tuple[str | None, frozenset[str]]:
    """(directory, enforceable controllers) of the cgroup v2 subtree runc would use, if delegated.

    runc places a relative cgroups path under the parent of its caller's
    cgroup (the caller's own has processes, so it cannot enable controllers).
    """
    if not (root / "cgroup.controllers").exists():
        return None, frozenset()  # v1: not delegable to a user
    own = next((line[3:] for line in proc_self_cgroup.splitlines() if line.startswith("0::")), None)
    if own is None or not own.startswith("/"):
        return None, frozenset()
    parent = root / os.path.dirname(own).lstrip("/")
    if (
        parent == root
        or not writable(str(parent), os.W_OK)
        or not writable(str(parent / "cgroup.subtree_control"), os.W_OK)
    ):
        return None, frozenset()
    try:
        available = set((parent / "cgroup.controllers").read_text().split())
    except OSError:
        return None, frozenset()
    return str(parent), frozenset(c for c in LIMIT_CONTROLLERS if c in available)


def userns_works(unshare: str | None = None, timeout: float = 5.0) -> tuple[bool, str]:
    """Actually create a user namespace (`unshare -Ur true`); (works, why not)."""
    unshare = unshare or shutil.which("unshare")
    if not unshare:
        return False, "no unshare binary to check user namespaces with"
    try:
        proc = subprocess.run([unshare, "-Ur", "true"], capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"unshare -Ur failed: {exc}"
    if proc.returncode != 0:
        return False, "unprivileged user namespaces do not work: " + proc.stderr.decode(errors="replace").strip()[:200]
    return True, ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def detect_host() -> RootlessHost:
    """This process's mappings and delegated cgroup (call only when not root)."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    both = shutil.which("newuidmap") and shutil.which("newgidmap")
    subuid = subordinate_range(_read("/etc/subuid"), name, uid) if both else None
    subgid = subordinate_range(_read("/etc/subgid"), name, uid) if both else None
    if subuid is None or subgid is None:
        subuid = subgid = None  # both or neither: a uid with no group breaks runc's setgid
    cgroup, limits = delegated_cgroup(_read("/proc/self/cgroup"))
    return RootlessHost(id_mappings(uid, subuid), id_mappings(gid, subgid), cgroup, limits)


class NoNetwork:
    """The network of a rootless runtime: no bridge, so nothing to attach or sweep.

    Has the parts of `BridgeNetwork` the runc driver calls."""

    def attachment(self, container_id: str) -> Attachment | None:
        return None

    async def attach(self, container_id: str, ports: list[PortMapping]) -> Attachment:
        raise SandboxError("a rootless node has no container bridge (it needs root)", id=container_id)

    ensure_attached = attach

    async def detach(self, container_id: str, *, sweep_rules: bool = False) -> None:
        return None

    async def sweep(self, keep: set[str]) -> list[str]:
        return []
