"""`--ttl 15m`, `--voter-stabilization 10s`: duration flags, parsed by
cloudless.duration so flags and the workload YAML read durations alike."""

from __future__ import annotations

from typing import Any

import click

from cloudless.duration import InvalidDuration, parse_duration


class Duration(click.ParamType):
    """A click option type: `10s`, `500ms`, `5m`, `1h30m` or seconds → float seconds, within bounds."""

    name = "duration"

    def __init__(self, minimum: float = 0.0, maximum: float = 30 * 86400.0) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value  # a default already in seconds
        flag = param.opts[0] if param is not None and param.opts else "duration"
        try:
            return parse_duration(value, field=flag, minimum=self.minimum, maximum=self.maximum)
        except InvalidDuration as exc:
            self.fail(exc.message.split(": ", 1)[1], param, ctx)
