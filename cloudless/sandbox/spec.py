"""OCI runtime spec (config.json, 1.0.2) from a ContainerSpec.

Pure: the host facts it needs (cgroup version, swap accounting, the network
namespace path, the resolved user) are arguments, so every field is unit-tested
without runc. The hardening mirrors Docker's defaults: a reduced capability
set, no_new_privileges, the seccomp profile in seccomp.py, Docker's masked and
read-only /proc and /sys paths, and a device cgroup that denies everything
runc does not add itself (null, zero, full, random, urandom, tty, ptmx, pts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cloudless.sandbox import seccomp
from cloudless.sandbox.rootless import RootlessHost
from cloudless.sandbox.runtime import ContainerSpec, InvalidContainerSpec

OCI_VERSION = "1.0.2"
CPU_PERIOD_US = 100_000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default set minus CAP_MKNOD (device nodes are refused by the device
# cgroup anyway), CAP_NET_RAW (raw sockets: ARP/ICMP spoofing on the bridge)
# and CAP_SETFCAP (granting file capabilities is not needed to run software).
CAPABILITIES: tuple[str, ...] = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)

MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# Raising a hard limit needs CAP_SYS_RESOURCE, which the node may lack: the
# caller passes min(this, its own hard limit).
NOFILE_LIMIT = 65536
RUN_TMPFS_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HostCgroups:
    version: Literal[1, 2]
    swap_accounting: bool  # v1: memory.memsw.* exists; v2: always true


@dataclass(frozen=True, slots=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()


def _parse_colon_file(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def resolve_user(user: str, passwd_text: str = "", group_text: str = "") -> ResolvedUser:
    """`uid[:gid]` or `name[:group]` against the rootfs's /etc/passwd and /etc/group texts.

    A bare uid/name takes the primary group from passwd (0 if the uid has no
    entry, as Docker does); supplementary groups come from /etc/group membership.
    """
    name, _, group = user.partition(":")
    passwd = _parse_colon_file(passwd_text)
    groups = _parse_colon_file(group_text)
    entry = None
    if name.isdigit():
        uid = int(name)
        entry = next((r for r in passwd if len(r) >= 4 and r[2] == name), None)
    else:
        entry = next((r for r in passwd if len(r) >= 4 and r[0] == name), None)
        if entry is None:
            raise InvalidContainerSpec(f"user {name!r} not found in the image's /etc/passwd", field="user")
        uid = int(entry[2])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((r for r in groups if len(r) >= 3 and r[0] == group), None)
            if g is None:
                raise InvalidContainerSpec(f"group {group!r} not found in the image's /etc/group", field="user")
            gid = int(g[2])
    else:
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    login = entry[0] if entry is not None else None
    extra = sorted(
        {int(r[2]) for r in groups if len(r) >= 4 and r[2].isdigit() and login and login in r[3].split(",")} - {gid}
    )
    return ResolvedUser(uid=uid, gid=gid, additional_gids=tuple(extra))


def _env_list(spec: ContainerSpec, hostname: str) -> list[str]:
    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    return [f"{k}={v}" for k, v in env.items()]


def _capabilities(user: ResolvedUser) -> dict[str, list[str]]:
    caps = list(CAPABILITIES)
    # Non-root processes get none effective (file capabilities still bounded by
    # the set); inheritable and ambient stay empty (CVE-2022-24769).
    active = caps if user.uid == 0 else []
    return {"bounding": caps, "effective": active, "permitted": active, "inheritable": [], "ambient": []}


def _mounts(spec: ContainerSpec, network_mode: str, etc_files: dict[str, str], rootless: bool = False) -> list[dict]:
    # Rootless: gid 5 (tty) has no mapping in a single-id user namespace.
    devpts_gid = [] if rootless else ["gid=5"]
    mounts: list[dict] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", *devpts_gid],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    ]
    if network_mode == "host" or rootless:
        # sysfs cannot be mounted fresh from the host's network namespace without
        # a user namespace, nor by a user namespace at all; bind the host's
        # read-only instead (as Docker and `runc spec --rootless` do).
        mounts.append(
            {
                "destination": "/sys",
                "type": "bind",
                "source": "/sys",
                "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
            }
        )
    else:
        mounts.append(
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        )
    if not rootless:  # rootless: the /sys bind already shows the host's cgroupfs, read-only
        mounts.append(
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            }
        )
    user_dests = {m.destination for m in spec.tmpfs} | {m.destination for m in spec.mounts}
    if spec.readonly_rootfs:
        # Note: runc gives a tmpfs the mode of the directory it covers when that
        # exists, so an image's /tmp (1777) and /run (755) keep their modes.
        for dest in ("/tmp", "/run"):
            if dest not in user_dests:
                mounts.append(
                    {
                        "destination": dest,
                        "type": "tmpfs",
                        "source": "tmpfs",
                        "options": ["nosuid", "nodev", "mode=1777", f"size={RUN_TMPFS_BYTES}"],
                    }
                )
    for t in spec.tmpfs:
        mounts.append(
            {
                "destination": t.destination,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", f"mode={t.mode:o}", f"size={t.size_bytes}"],
            }
        )
    for b in spec.mounts:
        mounts.append(
            {
                "destination": b.destination,
                "type": "bind",
                "source": b.source,
                "options": ["rbind", "rprivate", "nosuid", "nodev", "ro" if b.readonly else "rw"],
            }
        )
    for dest, source in sorted(etc_files.items()):
        if dest not in user_dests:
            mounts.append(
                {
                    "destination": dest,
                    "type": "bind",
                    "source": source,
                    "options": ["rbind", "rprivate", "nosuid", "nodev", "noexec", "ro"],
                }
            )
    return mounts


def _resources(spec: ContainerSpec, cgroups: HostCgroups, limits: frozenset[str] | None = None) -> dict:
    """`limits`: the controllers a rootless node may use (None: root, all of them).
    A rootless container gets no device rules: it cannot create device nodes anyway."""
    res: dict = {"devices": [{"allow": False, "access": "rwm"}]} if limits is None else {}
    if spec.memory_bytes is not None and (limits is None or "memory" in limits):
        memory: dict = {"limit": spec.memory_bytes}
        if cgroups.swap_accounting:
            # memory+swap == memory: no swap, so hitting the limit is a real OOM kill.
            memory["swap"] = spec.memory_bytes
        res["memory"] = memory
    if spec.cpu is not None and (limits is None or "cpu" in limits):
        res["cpu"] = {"quota": max(1000, round(spec.cpu * CPU_PERIOD_US)), "period": CPU_PERIOD_US}
    if spec.pids_limit is not None and (limits is None or "pids" in limits):
        res["pids"] = {"limit": spec.pids_limit}
    return res


def _namespaces(
    spec: ContainerSpec, netns_path: str | None, cgroups: HostCgroups, rootless: bool = False
) -> list[dict]:
    ns: list[dict] = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if spec.network == "bridge":
        if not netns_path:
            raise ValueError("bridge network needs the prepared network namespace path")
        ns.append({"type": "network", "path": netns_path})
    elif spec.network == "none":
        ns.append({"type": "network"})  # fresh namespace: loopback only
    if rootless:
        ns.append({"type": "user"})
    if cgroups.version == 2:
        ns.append({"type": "cgroup"})  # Docker's v2 default: the container sees its own cgroup as /
    return ns


def build_config(
    spec: ContainerSpec,
    *,
    user: ResolvedUser,
    cgroups: HostCgroups,
    cgroups_path: str,
    netns_path: str | None = None,
    etc_files: dict[str, str] | None = None,
    nofile_limit: int = NOFILE_LIMIT,
    rootless: RootlessHost | None = None,
) -> dict:
    """The config.json document for `spec` (a dict ready for json.dumps).

    `rootless`: the node is not root; run in a user namespace with its
    mappings, and only the limits its delegated cgroup can enforce."""
    hostname = spec.hostname or spec.id[:63]
    if rootless is not None:
        user = _rootless_user(spec, user, rootless)
    config: dict = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {
                "uid": user.uid,
                "gid": user.gid,
                **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {}),
            },
            "args": list(spec.args),
            "env": _env_list(spec, hostname),
            "cwd": spec.cwd,
            "capabilities": _capabilities(user),
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile_limit, "soft": nofile_limit}],
            "noNewPrivileges": True,
        },
        "root": {"path": spec.rootfs, "readonly": spec.readonly_rootfs},
        "hostname": hostname,
        "mounts": _mounts(spec, spec.network, etc_files or {}, rootless=rootless is not None),
        "annotations": {f"cloudless.label.{k}": v for k, v in spec.labels.items()},
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": _resources(spec, cgroups, None if rootless is None else rootless.limits),
            "namespaces": _namespaces(spec, netns_path, cgroups, rootless=rootless is not None),
            "seccomp": seccomp.default_profile(),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if rootless is not None:
        linux = config["linux"]
        linux["uidMappings"] = [m.as_oci() for m in rootless.uid_mappings]
        linux["gidMappings"] = [m.as_oci() for m in rootless.gid_mappings]
        if rootless.cgroup is None:
            # Nothing to enforce and nowhere writable: runc (rootless) then
            # skips cgroups; a path would only make it try the host's.
            del linux["cgroupsPath"]
    return config


def _rootless_user(spec: ContainerSpec, user: ResolvedUser, host: RootlessHost) -> ResolvedUser:
    """The user must have an id inside the namespace; supplementary groups without one are dropped."""
    if spec.network == "bridge":
        raise InvalidContainerSpec("a rootless node has no container bridge (ports need root)", field="network")
    if not host.maps_uid(user.uid) or not host.maps_gid(user.gid):
        mapped = (
            f"ids 0-{host.uid_mappings[-1].size} are mapped"
            if host.subordinate
            else "no subordinate ids in /etc/subuid and /etc/subgid with newuidmap/newgidmap; only 0:0 can run"
        )
        raise InvalidContainerSpec(
            f"user {user.uid}:{user.gid} has no id on this rootless node ({mapped})", field="user"
        )
    # Without subordinate ids runc must deny setgroups, so there are none to set.
    extra = tuple(g for g in user.additional_gids if host.maps_gid(g)) if host.subordinate else ()
    return ResolvedUser(uid=user.uid, gid=user.gid, additional_gids=extra)
