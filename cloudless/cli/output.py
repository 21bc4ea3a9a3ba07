"""How every command prints: rich for people, exactly one JSON document with --json."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from cloudless.errors import CloudlessError

stdout = Console()
stderr = Console(stderr=True)


def emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def fail(error: CloudlessError, as_json: bool) -> None:
    """Report an error and exit with its code; with --json the error is the document."""
    if as_json:
        emit_json(error.to_dict())
    else:
        stderr.print(f"[red]error:[/red] {error.message}")
    raise SystemExit(error.exit_code)
