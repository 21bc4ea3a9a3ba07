"""Durable file writes: after a crash a file holds its old content or its new
content, never a torn mix, and a write has reached the disk before it returns.

The one way to replace a file: write a uniquely named temporary file beside
it, fsync it, rename it over the old one, fsync the directory (the rename is
only durable once the directory entry is).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_directory(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Create `path` (it must not exist) holding `data`, fsynced; the caller fsyncs the directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`, all or nothing, durable when it returns."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
