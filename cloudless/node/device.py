"""What kind of device this node runs on: power source, battery, network.

Read from Linux sysfs (also what Android exposes) where possible; every value
can be overridden by a `cloudless node` flag. The result feeds gossip
metadata, autopilot's voter choice and the scheduler.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cloudless.errors import InvalidInput
from cloudless.gossip.metadata import RUNTIME_LABEL
from cloudless.sandbox.rootless import detect_host, userns_works
from cloudless.scheduler.feasible import LIMITS_LABEL

Power = Literal["ac", "battery"]
Network = Literal["wired", "wifi", "metered"]
DeviceClass = Literal["server", "pc", "laptop", "phone", "gateway"]
# What this node can run containers with: `runc` (root, runc, cgroups),
# `rootless` (runc in a user namespace, for a node that is not root),
# `memory` (the in-memory twin, tests and benchmarks), `none`.
Runtime = Literal["runc", "rootless", "memory", "none"]

_ARCH_NAMES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386"}


def oci_arch(machine: str) -> str:
    """The OCI/Go name of a `uname -m` architecture (what image indexes use)."""
    return _ARCH_NAMES.get(machine, machine)


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    power: Power = "ac"
    battery_pct: float | None = None
    charging: bool = False
    network: Network = "wired"
    cpu_count: int = 1
    memory_bytes: int = 0
    arch: str = ""
    device_class: DeviceClass = "server"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def detect_power(sysfs: Path = Path("/sys/class/power_supply")) -> tuple[Power, float | None, bool]:
    """Battery-powered when a battery exists and no mains supply is online."""
    batteries: list[tuple[float | None, str]] = []
    mains_online = False
    try:
        supplies = sorted(sysfs.iterdir())
    except OSError:
        return "ac", None, False
    for supply in supplies:
        kind = _read(supply / "type")
        if kind == "Battery":
            capacity = _read(supply / "capacity")
            status = _read(supply / "status") or ""
            batteries.append((float(capacity) if capacity and capacity.isdigit() else None, status))
        elif kind in ("Mains", "USB", "USB_C", "USB_PD") and _read(supply / "online") == "1":
            mains_online = True
    if not batteries:
        return "ac", None, False
    pct = batteries[0][0]
    charging = any(status in ("Charging", "Full") for _, status in batteries)
    if mains_online:
        return "ac", pct, charging
    return "battery", pct, charging


def detect_network(sysfs: Path = Path("/sys/class/net")) -> Network:
    """wifi when the only up, non-virtual interfaces are wireless."""
    wired = wifi = False
    try:
        interfaces = sorted(sysfs.iterdir())
    except OSError:
        return "wired"
    for iface in interfaces:
        if iface.name == "lo" or not (iface / "device").exists():
            continue  # virtual: bridges, veths, tunnels
        if _read(iface / "operstate") not in ("up", "unknown"):
            continue
        if (iface / "wireless").exists() or (iface / "phy80211").exists():
            wifi = True
        else:
            wired = True
    if wifi and not wired:
        return "wifi"
    return "wired"


def detect(
    power: Power | None = None,
    battery_pct: float | None = None,
    network: Network | None = None,
    device_class: DeviceClass | None = None,
) -> DeviceProfile:
    detected_power, detected_pct, charging = detect_power()
    has_battery = detected_pct is not None or detected_power == "battery"
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return DeviceProfile(
        power=power or detected_power,
        battery_pct=battery_pct if battery_pct is not None else detected_pct,
        charging=charging,
        network=network or detect_network(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=memory,
        arch=oci_arch(os.uname().machine),
        device_class=device_class or ("laptop" if has_battery else "server"),
    )


def _cgroups_mounted(root: Path) -> bool:
    # v2: one unified hierarchy with a controllers list; v1: per-controller dirs.
    return (root / "cgroup.controllers").exists() or (root / "memory").is_dir()


def unprivileged_userns(proc_sys: Path = Path("/proc/sys")) -> bool:
    """Whether the kernel lets a non-root user create user namespaces (what
    rootless runc needs): Debian's switch when it exists, and a non-zero limit."""
    switch = _read(proc_sys / "kernel" / "unprivileged_userns_clone")
    limit = _read(proc_sys / "user" / "max_user_namespaces")
    return switch != "0" and limit is not None and limit.isdigit() and int(limit) > 0


def runtime_labels(runtime: str) -> dict[str, str]:
    """The gossip labels that advertise `runtime`: a rootless node also says
    which limits its delegated cgroup can enforce, so placements can say which it cannot."""
    labels = {RUNTIME_LABEL: runtime}
    if runtime == "rootless":
        labels[LIMITS_LABEL] = ",".join(sorted(detect_host().limits))
    return labels


def _rootless_blockers(data_dir: Path | None, euid: int, userns: Callable[[], tuple[bool, str]] | None) -> list[str]:
    """Why rootless runc cannot work for this user (empty: it can)."""
    blockers = []
    if data_dir is not None:
        try:
            owner = Path(data_dir).stat().st_uid
        except OSError:
            owner = euid  # created by the node as this user
        if owner != euid:
            blockers.append(f"data dir {data_dir} is owned by uid {owner}, not {euid}")
    if userns is None:
        userns = userns_works
    works, why = userns()
    if not works:
        blockers.append(why)
    return blockers


def detect_runtime(
    forced: str | None = None,
    *,
    euid: int | None = None,
    runc: str | None = None,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    data_dir: Path | None = None,
    userns: Callable[[], tuple[bool, str]] | None = None,
) -> tuple[Runtime, str]:
    """(runtime, why): what this process can run containers with.

    `forced` ("runc", "rootless", "memory", "none"; from `--runtime` or
    CLOUDLESS_RUNTIME) wins, except that runc/rootless are refused when they
    cannot work, so a node never advertises a runtime it does not have.
    Not root: `rootless` when runc is present, a user namespace can actually
    be created (`userns`, default `unshare -Ur true`) and the data dir is the
    user's; cgroups are optional there (limits only in a delegated subtree)."""

    if forced in (None, "", "auto"):
        forced = None
    elif forced not in ("runc", "rootless", "memory", "none"):
        raise InvalidInput(f"unknown runtime {forced[:40]!r} (auto, runc, rootless, memory or none)", field="runtime")
    if forced == "none":
        return "none", "forced with --runtime none"
    if forced == "memory":
        return "memory", "in-memory runtime (tests and benchmarks)"
    euid = os.geteuid() if euid is None else euid
    runc = shutil.which("runc") if runc is None else runc
    if euid != 0:
        missing = [] if runc else ["no runc binary on PATH"]
        if forced == "runc":
            raise InvalidInput("runtime runc cannot work here: not root (use rootless)", field="runtime")
        if runc:
            missing = _rootless_blockers(data_dir, euid, userns)
        if not missing:
            return "rootless", f"not root (uid {euid}): rootless runc in a user namespace"
        why = "not root, and rootless runc cannot work: " + "; ".join(missing)
        if forced == "rootless":
            raise InvalidInput(f"runtime rootless cannot work here: {'; '.join(missing)}", field="runtime")
        return "none", why
    missing = [] if runc else ["no runc binary on PATH"]
    if not _cgroups_mounted(cgroup_root):
        missing.append(f"no cgroup hierarchy at {cgroup_root}")
    if forced == "rootless":
        raise InvalidInput("runtime rootless is for a node that is not root (use runc)", field="runtime")
    if not missing:
        return "runc", "root, runc and cgroups"
    why = "; ".join(missing)
    if forced == "runc":
        raise InvalidInput(f"runtime runc cannot work here: {why}", field="runtime")
    return "none", why
