"""How this program runs itself again: from a venv/wheel install or as a PyInstaller bundle.

A frozen bundle has no `python` to hand `-m cloudless` or a script path to:
`sys.executable` is the bundle itself. Anything that spawns Cloudless (dev
clusters spawning nodes, the sandbox spawning the log shim) builds its argv
here, so the two ways of installing behave alike.
"""

from __future__ import annotations

import os
import sys

# Hidden first arguments (see `run_hidden_entry`): act as the log shim
# (cloudless/sandbox/logs.py run as __main__); report the native extensions.
LOG_SHIM_ARG = "__cloudless-log-shim"
NATIVE_CHECK_ARG = "__cloudless-native-check"

# The compiled modules Cloudless uses. pyfastcdc alone has a pure-Python fallback
# (much slower) that it takes silently when its Cython modules are missing.
NATIVE_MODULES = (
    "pyfastcdc.cy.fastcdc",
    "rocksdict.rocksdict",
    "zstandard.backend_c",
    "msgspec._core",
    "cryptography.hazmat.bindings._rust",
    "aioquic._buffer",
    "pylsqpack._binding",
)


def frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def cloudless_argv() -> list[str]:
    """The argv prefix that runs the `cloudless` command."""
    if frozen():
        return [sys.executable]
    return [sys.executable, "-m", "cloudless"]


def cloudless_env() -> dict[str, str]:
    """Environment for a *long-lived* child running `cloudless_argv()`.

    A PyInstaller one-file child spawned with the parent's environment reuses the
    parent's unpacked directory, which is deleted when the parent exits; a node
    outliving `dev up` must unpack its own copy.
    """
    env = dict(os.environ)
    if frozen():
        env["PYINSTALLER_RESET_ENVIRONMENT"] = "1"
    return env


def log_shim_argv() -> list[str]:
    """The argv prefix that runs the log shim; its own arguments follow (`shim ...`).

    Not frozen: an isolated interpreter without site packages runs logs.py by
    path (start latency, see logs.py). Frozen: the bundle with the hidden entry
    argument; the shim reuses the node's unpacked directory, and once forked it
    needs only what is already loaded (logs.py's shim path uses C builtins).
    """
    if frozen():
        return [sys.executable, LOG_SHIM_ARG]
    # The file itself, not an import of it: sandbox (runc.py) imports this module.
    return [sys.executable, "-I", "-S", os.path.join(os.path.dirname(__file__), "sandbox", "logs.py")]


def restore_library_path() -> None:
    """Frozen: give child processes the library path this program was started with.

    The one-file bootloader sets LD_LIBRARY_PATH to its unpacked directory for the
    frozen interpreter (saving the caller's value in LD_LIBRARY_PATH_ORIG); left in
    place, runc, ip and iptables would load the bundle's copies of shared libraries.
    This process is unaffected: the loader reads the variable once, at exec.
    """
    if not frozen():
        return
    original = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is not None:
        os.environ["LD_LIBRARY_PATH"] = original
    else:
        os.environ.pop("LD_LIBRARY_PATH", None)


def native_report() -> dict[str, str]:
    """module -> the file its compiled code was loaded from (or why not)."""
    # Only the hidden native check needs these; every command imports this module.
    import importlib
    import warnings

    report = {}
    for name in NATIVE_MODULES:
        try:
            path = getattr(importlib.import_module(name), "__file__", None) or ""
            report[name] = path if path.endswith(".so") else f"not compiled: {path or 'no file'}"
        except Exception as e:  # reported, not raised: the point is to list every failure
            report[name] = f"error: {type(e).__name__}: {e}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pyfastcdc import FastCDC
        if not FastCDC.__module__.startswith("pyfastcdc.cy."):
            report["pyfastcdc"] = f"not compiled: FastCDC from {FastCDC.__module__}"
    except Exception as e:
        report["pyfastcdc"] = f"error: {type(e).__name__}: {e}"
    return report


def run_hidden_entry(argv: list[str]) -> None:
    """Run the hidden entry point named by argv[1], if any; else return."""
    if len(argv) > 1 and argv[1] == NATIVE_CHECK_ARG:
        import json  # the hidden native check only

        report = native_report()
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        raise SystemExit(0 if all(v.endswith(".so") for v in report.values()) else 1)
    if len(argv) > 1 and argv[1] == LOG_SHIM_ARG:
        import runpy  # the log shim only: it starts with as little loaded as it can

        # As __main__, so logs.py skips its module-level imports (json, trio) like the unfrozen shim.
        sys.argv = [argv[0], *argv[2:]]
        runpy.run_module("cloudless.sandbox.logs", run_name="__main__", alter_sys=True)
        raise SystemExit(0)
