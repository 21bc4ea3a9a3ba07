"""Waiting on state that has no event to wait on.

Tests wait on other processes, the kernel, files, a peer's counters and the
statistics of the component under test; none of these offers a trio.Event,
so this one helper polls. Bound every call with `trio.fail_after` (or
`move_on_after`); the deadline, not the helper, decides how long is too long.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import trio


async def wait_until(predicate: Callable[[], object | Awaitable[object]], *, interval: float = 0.01) -> None:
    """Return once `predicate()` (sync or async) is true, checking every `interval` seconds."""
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await trio.sleep(interval)
