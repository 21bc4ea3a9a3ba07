"""Drive an *installed* `cloudless` (a wheel in a fresh venv, a pipx app, the
PyInstaller bundle) the way a user does: by its path, from a directory that is
not the source tree, with nothing of the dev venv on its path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from cloudless.cli.main import COMMANDS
from tests.harness.node_cluster import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus anything that would lead an installed program
    back to the source tree or the dev venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    env.pop("CLOUDLESS_CONFIG", None)
    env.update(extra)
    return env


def run(argv: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)


def check_commands(exe: list[str], cwd: Path, only: list[str] | None = None) -> None:
    """`--help` lists every command of the table, and each one (or each in `only`) loads (`CMD --help`)."""
    top = run([*exe, "--help"], cwd)
    assert top.returncode == 0, top.stderr
    # A command's row starts two spaces in; a longer help wraps onto deeper-indented lines.
    rows = top.stdout.split("Commands:", 1)[1].splitlines()
    listed = {line.split()[0] for line in rows if line.startswith("  ") and not line.startswith("   ")}
    assert listed == set(COMMANDS), f"listed {sorted(listed)}, want {sorted(COMMANDS)}"
    for name in sorted(COMMANDS) if only is None else only:
        proc = run([*exe, name, "--help"], cwd)
        assert proc.returncode == 0, f"cloudless {name} --help: {proc.stdout}\n{proc.stderr}"
        assert "Usage:" in proc.stdout


def bootstrap_status_shutdown(exe: list[str], workdir: Path) -> dict:
    """Start a one-node cluster from `exe` on loopback, ask its status through the
    admin config it writes, stop it with SIGTERM; the status document."""
    data = workdir / "node1"
    data.mkdir(parents=True)
    with open(data / "node.out", "wb") as out:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [*exe, "node", "--data-dir", str(data), "--listen", f"127.0.0.1:{free_port()}", "--name", "node1"],
            cwd=workdir,
            env=clean_env(CLOUDLESS_RUNTIME="none"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        config = data / "admin.yaml"

        def status() -> dict | None:
            if proc.poll() is not None:
                raise AssertionError(f"node exited {proc.returncode}: {(data / 'node.out').read_text()[-3000:]}")
            if not config.exists():
                return None
            got = run([*exe, "status", "--json", "--config", str(config)], workdir, timeout=30)
            if got.returncode != 0:
                return None
            doc = json.loads(got.stdout)
            return doc if doc["leader"] == "node1" else None

        doc = wait_for(status, 90, "the installed node to lead")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (data / "node.out").read_text()[-3000:]
        return doc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
