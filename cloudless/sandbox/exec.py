"""`runc exec` with its IO streamed: pipes, or a pseudo-terminal.

With a tty, runc allocates the pty inside the container (its own devpts)
and the process gets it as its controlling terminal, so a ^C typed by the
client reaches it as SIGINT. runc hands that terminal out only when it
detaches (`--console-socket` needs `--detach`, and then nobody can wait for
the exit status), so runc stays attached and is given a host pty as its
stdio: it copies between the two, puts ours in raw mode and copies our window
size over on SIGWINCH. Without a tty, stdout and stderr are
pipes read by two tasks into a channel of size 0: the process is read only as
fast as the caller takes its output, so a command printing without end costs
one chunk per stream of memory here.

`runc exec` (not detached) stays the exec'd process's parent and exits with
its status, so waiting for runc is waiting for the command. The exec'd
process's pid goes to a pid file: killing runc alone would leave it running.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import termios
import tty as tty_mode
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import trio

CHUNK = 64 * 1024

Output = tuple[Literal["stdout", "stderr"], bytes]


class RuncExecSession:
    """One running `runc exec` (see the module doc); made by `open_runc_exec`."""

    def __init__(self, proc: trio.Process | None, tty: trio.lowlevel.FdStream | None, tty_fd: int | None) -> None:
        self.proc = proc  # None only while a tty session is being set up
        self._tty = tty
        self._tty_fd = tty_fd
        self._outputs: trio.MemoryReceiveChannel[Output] | None = None

    async def read_output(self) -> Output | None:
        if self._tty is not None:
            try:
                data = await self._tty.receive_some(CHUNK)
            except trio.BrokenResourceError:  # EIO: every holder of the terminal's other end closed it
                return None
            return ("stdout", data) if data else None
        assert self._outputs is not None
        try:
            return await self._outputs.receive()
        except trio.EndOfChannel:
            return None

    async def write_stdin(self, data: bytes) -> None:
        assert self.proc is not None
        target = self._tty if self._tty is not None else self.proc.stdin
        if target is None:
            return  # stdin was not asked for: the process reads /dev/null
        try:
            await target.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the process closed its stdin or exited: like writing to a closed pipe, its input is dropped

    async def close_stdin(self) -> None:
        if self._tty is not None:
            await self.write_stdin(b"\x04")  # the terminal's EOF character (VEOF), as a typed ^D
        elif self.proc is not None and self.proc.stdin is not None:
            await self.proc.stdin.aclose()

    def resize(self, rows: int, cols: int) -> None:
        if self._tty_fd is not None:
            try:
                fcntl.ioctl(self._tty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            except OSError:
                return  # the terminal is already gone
            if self.proc is not None and self.proc.returncode is None:
                self.proc.send_signal(signal.SIGWINCH)  # runc copies our size into the container's terminal

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()


async def _pump(stream: trio.abc.ReceiveStream, name: Literal["stdout", "stderr"], out: trio.MemorySendChannel) -> None:
    async with out:
        while data := await stream.receive_some(CHUNK):
            await out.send((name, data))


async def _wait_pid_file(pid_file: Path, proc: trio.Process) -> None:
    """Until runc has written the exec'd process's pid (or exited), at most a few seconds."""
    with trio.move_on_after(5):
        while True:
            if _exists(pid_file) or proc.poll() is not None:
                return
            await trio.sleep(0.01)


def _exists(path: Path) -> bool:
    return path.exists()


def _kill_exec_process(pid_file: Path) -> None:
    try:
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
    except (OSError, ValueError):
        pass  # never started, or already gone


@asynccontextmanager
async def open_runc_exec(
    runc_argv: list[str],
    work_dir: Path,
    container_id: str,
    args: list[str],
    *,
    tty: bool,
    stdin: bool,
    rows: int,
    cols: int,
) -> AsyncIterator[RuncExecSession]:
    """`runc_argv` is runc with its global flags (`[runc, "--root", ...]`); `work_dir` holds the pid file."""
    pid_file = work_dir / f"exec-{os.getpid()}-{trio.current_time():.6f}.pid"
    argv = [*runc_argv, "exec", "--pid-file", str(pid_file), *(["--tty"] if tty else []), container_id, *args]
    proc: trio.Process | None = None
    tty_stream: trio.lowlevel.FdStream | None = None
    try:
        if tty:
            master, terminal = os.openpty()
            try:
                tty_mode.setraw(terminal)  # runc does too, but our first bytes may come before it has
                tty_stream = trio.lowlevel.FdStream(master)  # owns master now (and makes it non-blocking)
                session = RuncExecSession(None, tty_stream, master)
                session.resize(rows, cols)  # runc copies it into the container's terminal as it starts
                proc = await trio.lowlevel.open_process(
                    argv, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True
                )
            finally:
                os.close(terminal)  # runc holds it now: EOF (EIO) on ours once runc exits
            session.proc = proc
            # runc copies our size into the container's terminal only on SIGWINCH after it has
            # started the process (a command that reads its size at once may still see 0x0, as
            # under docker exec): once the process runs, have it copy the size now.
            await _wait_pid_file(pid_file, proc)
            session.resize(rows, cols)
            yield session
        else:
            proc = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            session = RuncExecSession(proc, None, None)
            send, receive = trio.open_memory_channel[Output](0)
            session._outputs = receive
            async with trio.open_nursery() as nursery:
                async with send:
                    assert proc.stdout is not None and proc.stderr is not None
                    nursery.start_soon(_pump, proc.stdout, "stdout", send.clone())
                    nursery.start_soon(_pump, proc.stderr, "stderr", send.clone())
                yield session
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc is not None and proc.returncode is None:
                # runc writes the pid file just after starting the process, which may already
                # have printed: give it a moment, or the process would outlive its runc.
                await _wait_pid_file(pid_file, proc)
                _kill_exec_process(pid_file)
                proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
            if tty_stream is not None:
                await tty_stream.aclose()
            pid_file.unlink(missing_ok=True)
