"""Durations as people write them: `10s`, `500ms`, `5m`, `1h30m`, `2d`, or a
plain number of seconds (`90`, `0.5`).

Go's `time.ParseDuration` grammar without signs: one or more `<number><unit>`
terms, largest unit first is not required but each unit at most once. Parsing
is bounded (text length, value range) and errors name the field, so the
workload spec, its YAML and the CLI flags all report `health_check.interval_s:
'10x' is not a duration ...` the same way.
"""

from __future__ import annotations

import math
import re

from cloudless.errors import InvalidInput

UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_TEXT = 64
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_TERM = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_WHOLE = re.compile(rf"^(?:{_NUMBER}(?:ms|s|m|h|d))+$")
_PLAIN = re.compile(rf"^{_NUMBER}$")
EXAMPLES = "e.g. 10s, 500ms, 5m, 1h30m, or a number of seconds"


class InvalidDuration(InvalidInput):
    """A duration that does not parse or is out of its field's range; the message names the field."""


def parse_duration(
    value: str | int | float, *, field: str, minimum: float = 0.0, maximum: float = 30 * 86400.0
) -> float:
    """Seconds, or InvalidDuration naming `field`.

    Text is read to the microsecond; a number is taken as seconds, exactly
    (so a spec printed as YAML reads back unchanged).
    """
    if isinstance(value, bool):  # YAML `yes`: a bool is an int to Python
        raise _fail(field, f"{value!r} is not a duration ({EXAMPLES})")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise _fail(field, f"{value!r} is not a finite duration")
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_TEXT:
            raise _fail(field, f"is longer than {MAX_TEXT} characters")
        if _PLAIN.match(text):
            seconds = float(text)
        elif _WHOLE.match(text):
            seconds = 0.0
            seen: set[str] = set()
            for number, unit in _TERM.findall(text):
                if unit in seen:
                    raise _fail(field, f"{value!r} gives the unit {unit} twice")
                seen.add(unit)
                seconds += float(number) * UNITS[unit]
        else:
            raise _fail(field, f"{value!r} is not a duration ({EXAMPLES})")
        seconds = round(seconds, 6)  # 0.1h is 360.00000000000006 in binary floating point
    else:
        raise _fail(field, f"expected a duration ({EXAMPLES}), not {type(value).__name__}")
    if seconds < minimum:
        raise _fail(field, f"must be ≥ {format_duration(minimum)}")
    if seconds > maximum:
        raise _fail(field, f"must be ≤ {format_duration(maximum)}")
    return seconds


def format_duration(seconds: float) -> str:
    """Text `parse_duration` reads back as `seconds` (to the microsecond): units
    for whole milliseconds (5400 → "1h30m", 0.5 → "500ms"), else plain seconds."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"not a duration: {seconds!r}")
    seconds = round(seconds, 6)
    millis = round(seconds * 1000)
    if millis / 1000 != seconds:
        return f"{seconds:.6f}".rstrip("0")
    if millis == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _fail(field: str, message: str) -> InvalidDuration:
    return InvalidDuration(f"{field}: {message}", field=field)
