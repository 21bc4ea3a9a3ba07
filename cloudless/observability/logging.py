"""Structured logs: an event name plus fields, as JSON lines to a file and
readable `event key=value` lines on stderr.

The one style: `log.info("raft.became_leader", extra={"node": n, "term": t})`.
Every key of `extra` is a field of the line, including names the stdlib
reserves for LogRecord attributes (`name`, `msg`, `message`, ...), which
would otherwise raise KeyError at the call site. The older nested form
`extra={"fields": {...}}` is flattened to the same fields.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
# Keys of the JSON line itself; a field with one of these names is written as `<name>_`.
_HEADER_KEYS = frozenset({"ts", "level", "logger", "event", "exception"})
_PRIMITIVES = (int, float, str, bool, type(None))


def _flatten(extra: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in extra.items():
        if key == "fields" and isinstance(value, Mapping):
            fields.update({str(k): v for k, v in value.items()})
        else:
            fields[str(key)] = value
    return fields


class StructuredLogger(logging.Logger):
    """A Logger whose `extra` keys all become fields (`record.fields`).

    Keys that are free LogRecord attribute names are also set as attributes,
    as the stdlib does, so other handlers keep seeing them; reserved names
    stay only in `record.fields` instead of raising KeyError.
    """

    def makeRecord(
        self,
        name: str,
        level: int,
        fn: str,
        lno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        extra: Mapping[str, object] | None = None,
        sinfo: str | None = None,
    ) -> logging.LogRecord:
        record = super().makeRecord(name, level, fn, lno, msg, args, exc_info, func, None, sinfo)
        if extra:
            fields = _flatten(extra)
            for key, value in fields.items():
                if key not in _RECORD_ATTRIBUTES and key != "fields":
                    record.__dict__[key] = value
            record.fields = fields
        return record


def install_logger_class() -> None:
    """Make loggers created from now on StructuredLoggers (imported by `cloudless/__init__`,
    before any module creates its logger). Leaves another library's logger class alone."""
    if logging.getLoggerClass() is logging.Logger:
        logging.setLoggerClass(StructuredLogger)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of a record: `record.fields` plus any non-standard attribute
    (records from loggers that are not StructuredLoggers carry `extra` that way)."""
    fields: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRIBUTES and key != "fields":
            fields[key] = value
    carried = record.__dict__.get("fields")
    if isinstance(carried, Mapping):
        fields.update(_flatten({"fields": carried}))
    return fields


def _json_value(value: object) -> object:
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_json_value(v) for v in items]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            doc[f"{key}_" if key in _HEADER_KEYS else key] = _json_value(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=False, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        tail = " ".join(f"{k}={v}" for k, v in record_fields(record).items())
        line = f"{stamp} {record.levelname[:4].lower():4} {record.getMessage()} {tail}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(log_dir: Path | None, level: str = "info", console: bool = True) -> None:
    """Install handlers on the root logger: rotating JSON file and stderr."""
    install_logger_class()
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            log_dir / "node.log", maxBytes=16 * 1024 * 1024, backupCount=4
        )
        file_handler.setFormatter(JsonLineFormatter())
        root.addHandler(file_handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(ConsoleFormatter())
        root.addHandler(stream)
