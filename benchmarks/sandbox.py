"""Sandbox figures: container start latency beside bare runc, 50 concurrent starts, image import.

Run as root: `.venv/bin/python benchmarks/sandbox.py [--runs 30] [--concurrent 50]`.
Prints one JSON object.

- start latency: request -> process running. Ours is `RuncRuntime.create` +
  `start` (spec validation, user resolution, config.json, the log shim,
  `runc create`, `runc start`); bare runc is `runc create` + `runc start` of
  a bundle with the same config.json (same mounts, limits, seccomp), stdio
  to /dev/null. Runs alternate
  (ours, bare, ours, ...) in one process so both see the same machine load.
  Network "none" for both (bare runc has no bridge); the bridge figure is
  reported separately.
- concurrent: N containers created and started at once (bridge network, each
  with its own veth, address and netns); failures are counted, not hidden.
- image import: an OCI layout imported (verify + store + unpack) by the image
  engineer's ImageStore, if that module is present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudless.sandbox.network import BridgeConfig
from cloudless.sandbox.runc import RuncRuntime
from cloudless.sandbox.runtime import ContainerSpec
from cloudless.sandbox.spec import build_config, resolve_user

BRIDGE = BridgeConfig(bridge="clbench0", subnet="10.88.252.0/24", tag="clbench", veth_prefix="clb")


def build_rootfs(root: Path) -> str:
    (root / "bin").mkdir(parents=True)
    for d in ("etc", "tmp", "run"):
        (root / d).mkdir()
    (root / "tmp").chmod(0o1777)
    shutil.copy("/usr/bin/busybox", root / "bin" / "busybox")
    for applet in subprocess.run(["/usr/bin/busybox", "--list"], capture_output=True, text=True).stdout.split():
        if applet != "busybox":
            os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    for name in ("hosts", "hostname", "resolv.conf"):
        (root / "etc" / name).write_text("")
    return str(root)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(pct(ms, 0.95), 2), "n": len(ms)}


async def bare_runc_start(rt: RuncRuntime, bundle: Path, root: Path, cid: str) -> float:
    runc = rt.runc
    t0 = time.perf_counter()
    await trio.run_process([runc, "--root", str(root), "create", "--bundle", str(bundle), cid],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    await trio.run_process([runc, "--root", str(root), "start", cid], stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    await trio.run_process([runc, "--root", str(root), "delete", "--force", cid], check=False)
    return elapsed


async def ours_start(rt: RuncRuntime, spec: ContainerSpec) -> float:
    t0 = time.perf_counter()
    await rt.create(spec)
    await rt.start(spec.id)
    elapsed = time.perf_counter() - t0
    await rt.delete(spec.id)
    return elapsed


async def start_latency(rt: RuncRuntime, rootfs: str, work: Path, runs: int) -> dict:
    ours, bare, bridged = [], [], []
    base = ContainerSpec(id="x", rootfs=rootfs, args=["sleep", "1000"], network="none", readonly_rootfs=True)
    bundle = work / "bare-bundle"
    bundle.mkdir()
    bare_root = work / "bare-root"
    bare_root.mkdir()
    # The same /etc bind mounts as ours, so both bundles carry the same mount list.
    etc = work / "bare-etc"
    etc.mkdir()
    etc_files = {}
    for name in ("hosts", "hostname", "resolv.conf"):
        (etc / name).write_text("127.0.0.1 localhost\n" if name == "hosts" else "")
        etc_files[f"/etc/{name}"] = str(etc / name)
    for i in range(runs + 2):  # the first pair warms caches and is dropped
        spec = ContainerSpec(**{**_fields(base), "id": f"lat-{i}"})
        ours_s = await ours_start(rt, spec)
        cfg = build_config(
            ContainerSpec(**{**_fields(base), "id": f"bare-{i}"}),
            user=resolve_user("0:0"),
            cgroups=rt.cgroups,
            cgroups_path=f"cloudless-bench-bare/bare-{i}",
            etc_files=etc_files,
            nofile_limit=rt._nofile_limit(),
        )
        (bundle / "config.json").write_text(json.dumps(cfg))
        bare_s = await bare_runc_start(rt, bundle, bare_root, f"bare-{i}")
        bridge_s = await ours_start(rt, ContainerSpec(**{**_fields(base), "id": f"br-{i}", "network": "bridge"}))
        if i >= 2:
            ours.append(ours_s)
            bare.append(bare_s)
            bridged.append(bridge_s)
    o, b = summary(ours), summary(bare)
    return {
        "ours_start_p50_ms": o["p50_ms"],
        "ours_start_p95_ms": o["p95_ms"],
        "runc_start_p50_ms": b["p50_ms"],
        "runc_start_p95_ms": b["p95_ms"],
        "ratio": round(o["p50_ms"] / b["p50_ms"], 3),
        "target_p50_ms": round(1.5 * b["p50_ms"] + 20, 2),
        "meets_target": o["p50_ms"] <= 1.5 * b["p50_ms"] + 20,
        "ours_bridge_start_p50_ms": summary(bridged)["p50_ms"],
        "ours_bridge_start_p95_ms": summary(bridged)["p95_ms"],
        "runs": len(ours),
    }


def _remove_bare_cgroups() -> None:
    """rmdir the (empty) parent cgroup the bare runc runs used, in every hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        root = "/sys/fs/cgroup/" + controllers.replace("name=", "") if controllers else "/sys/fs/cgroup/unified"
        try:
            os.rmdir(f"{root}{own.rstrip('/')}/cloudless-bench-bare")
        except OSError:
            pass


def _fields(spec: ContainerSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__struct_fields__}


async def concurrent_starts(rt: RuncRuntime, rootfs: str, n: int, network: str) -> dict:
    failures: list[str] = []
    latencies: list[float] = []

    async def one(i: int) -> None:
        spec = ContainerSpec(id=f"conc-{network}-{i}", rootfs=rootfs, args=["sleep", "1000"], network=network,
                             readonly_rootfs=True)  # fmt: skip
        t0 = time.perf_counter()
        try:
            await rt.create(spec)
            await rt.start(spec.id)
            latencies.append(time.perf_counter() - t0)
        except Exception as e:  # counted and reported, never hidden
            failures.append(f"{spec.id}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    wall = time.perf_counter() - t0
    running = sum(1 for s in await rt.list() if s.status == "running")
    async with trio.open_nursery() as nursery:
        for s in await rt.list():
            nursery.start_soon(rt.delete, s.id)
    out = {"containers": n, "network": network, "failures": len(failures), "running_after": running,
           "wall_s": round(wall, 3), **{f"start_{k}": v for k, v in summary(latencies).items()}} if latencies else \
          {"containers": n, "network": network, "failures": len(failures), "running_after": running}  # fmt: skip
    if failures:
        out["failure_samples"] = failures[:3]
    return out


def image_import(work: Path, size_mb: int) -> dict:
    try:
        from cloudless.sandbox.imagebuild import synthetic_image
        from cloudless.sandbox.images import ImageStore
    except ImportError as e:
        return {"missing": f"image modules not available: {e}"}
    image = synthetic_image(size_mb << 20, layers=4, files_per_layer=64, compressible=0.5, seed=1)
    layout = image.write(work / "image", "layout")
    uncompressed = sum(len(x) for x in image.uncompressed)
    compressed = sum(len(x) for x in image.compressed)
    store = ImageStore(work / "images")
    t0 = time.perf_counter()
    store.import_path(layout)
    elapsed = time.perf_counter() - t0
    return {
        "uncompressed_mb": round(uncompressed / 1e6, 1),
        "compressed_mb": round(compressed / 1e6, 1),
        "seconds": round(elapsed, 3),
        "import_unpack_mb_per_s": round(uncompressed / 1e6 / elapsed, 1),
        "unpacked_layers": store.unpack_layers,
        "compression": image.compression,
    }


async def main_async(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="cloudless-bench-"))
    try:
        rootfs = build_rootfs(work / "rootfs")
        rt = RuncRuntime(work / "state", bridge=BRIDGE)
        try:
            latency = await start_latency(rt, rootfs, work, args.runs)
            conc_none = await concurrent_starts(rt, rootfs, args.concurrent, "none")
            conc_bridge = await concurrent_starts(rt, rootfs, args.concurrent, "bridge")
        finally:
            with trio.CancelScope(shield=True):
                for s in await rt.list():
                    await rt.delete(s.id)
                await rt.sweep()
                await rt.network.remove_bridge()
                await rt.aclose()
                _remove_bare_cgroups()
        images = await trio.to_thread.run_sync(image_import, work, args.image_mb)
        return {
            "benchmark": "sandbox",
            "start_latency": latency,
            "concurrent_none": conc_none,
            "concurrent_bridge": conc_bridge,
            "image_import": images,
            "workload": {
                "process": "busybox sleep",
                "rootfs": "busybox-static, read-only",
                "runs": args.runs,
                "concurrent": args.concurrent,
                "image_mb": args.image_mb,
            },  # fmt: skip
            "machine": {
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "runc": subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
                "cgroup_version": rt.cgroups.version,
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--concurrent", type=int, default=50)
    p.add_argument("--image-mb", type=int, default=64)
    args = p.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"benchmark": "sandbox", "error": "needs root (runc, cgroups, netns)"}))
        raise SystemExit(1)
    print(json.dumps(trio.run(main_async, args), sort_keys=True))


if __name__ == "__main__":
    main()
