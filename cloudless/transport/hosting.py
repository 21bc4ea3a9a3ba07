"""One nursery per trio run for connections made outside any nursery.

`Carrier.connect()` returns a live connection to callers that hold no
nursery (the CLI, RPC clients), so something must run its reader and
writer after `connect` returns. Instead of a hand-written system task per
connection, every such task runs in one nursery hosted by one system task
and is started with `nursery.start`: an error before the task reports
ready propagates to the caller (a failed handshake fails `connect`), and
an error after it is logged with its traceback. Logging is the right end
there: a system task that raises crashes the whole trio run
(TrioInternalError), and the connection's owner already sees the failure,
because the session fails its streams with the cause (see
`MuxSession.run`, `QuicCarrier.run`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)


class _Host:
    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self.ready = trio.Event()
        self.started = 0
        self.failed = 0


_HOST: trio.lowlevel.RunVar[_Host] = trio.lowlevel.RunVar("cloudless_detached_host")


async def _serve_host(host: _Host) -> None:
    async with trio.open_nursery() as nursery:
        host.nursery = nursery
        host.ready.set()
        await trio.sleep_forever()


async def _host() -> _Host:
    try:
        host = _HOST.get()
    except LookupError:
        host = _Host()
        _HOST.set(host)  # before the first await, so concurrent callers share it
        trio.lowlevel.spawn_system_task(_serve_host, host, name="cloudless detached connections")
    await host.ready.wait()
    return host


class _ReportingStatus:
    """Passes `started()` through and remembers that it happened."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self._inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self._inner.started(value)


async def start_detached(async_fn: Callable[..., Awaitable[Any]], *args: Any, name: str) -> Any:
    """`await nursery.start(async_fn, *args)` in the run's detached nursery.

    Returns what `async_fn` passes to `task_status.started()`; an exception
    raised before that propagates here. One raised after it is logged
    (`transport.detached_task_failed`, with traceback) and counted.
    """
    host = await _host()
    assert host.nursery is not None

    async def guarded(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        status = _ReportingStatus(task_status)
        try:
            await async_fn(*args, task_status=status)
        except Exception:
            if not status.done:
                raise
            host.failed += 1
            log.exception("transport.detached_task_failed", extra={"task": name})

    host.started += 1
    return await host.nursery.start(guarded, name=name)


def statistics() -> dict[str, int]:
    """Tasks started and tasks that ended in an error, in this trio run."""
    try:
        host = _HOST.get()
    except LookupError:
        return {"started": 0, "failed": 0, "running": 0}
    running = len(host.nursery.child_tasks) if host.nursery is not None else 0
    return {"started": host.started, "failed": host.failed, "running": running}
