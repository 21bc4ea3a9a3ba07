"""`runc exec` with its IO streamed: pipes, or a pseudo-terminal.

With a tty, runc allocates the pty inside the container (its own devpts) and
hands the master to us over a unix socket (`--console-socket`, SCM_RIGHTS),
as containerd does; the process gets it as its controlling terminal, so ^C
typed by the client reaches it as SIGINT. Without one, stdout and stderr are
pipes read by two tasks into a channel of size 0: the process is read only as
fast as the caller takes its output, so a command printing without end costs
one chunk per stream of memory here.

`runc exec` (not detached) stays the exec'd process's parent and exits with
its status, so waiting for runc is waiting for the command. The exec'd
process's pid goes to a pid file: killing runc alone would leave it running.
"""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import trio

from cloudless.sandbox.runtime import RuncFailed

CHUNK = 64 * 1024
CONSOLE_TIMEOUT = 30.0  # runc hands over the pty master this fast, or failed
_STDERR_KEEP = 4096

Output = tuple[Literal["stdout", "stderr"], bytes]


class RuncExecSession:
    """One running `runc exec` (see the module doc); made by `open_runc_exec`."""

    def __init__(self, proc: trio.Process, tty: trio.lowlevel.FdStream | None, tty_fd: int | None) -> None:
        self.proc = proc
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
        elif self.proc.stdin is not None:
            await self.proc.stdin.aclose()

    def resize(self, rows: int, cols: int) -> None:
        if self._tty_fd is not None:
            try:
                fcntl.ioctl(self._tty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            except OSError:
                pass  # the terminal is already gone

    async def wait(self) -> int:
        return await self.proc.wait()


async def _pump(stream: trio.abc.ReceiveStream, name: Literal["stdout", "stderr"], out: trio.MemorySendChannel) -> None:
    async with out:
        while data := await stream.receive_some(CHUNK):
            await out.send((name, data))


async def _receive_console(listener: trio.socket.SocketType, proc: trio.Process) -> int:
    """The pty master fd runc sends over the console socket; RuncFailed if runc exits first."""
    fds: list[int] = []
    with trio.move_on_after(CONSOLE_TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def runc_exited() -> None:
                await proc.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(runc_exited)
            conn, _ = await listener.accept()
            with conn:
                _, ancdata, _, _ = await conn.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("i")))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(data[: len(data) - len(data) % received.itemsize])
                    fds.extend(received)
            nursery.cancel_scope.cancel()
    if not fds:
        raise RuncFailed("runc exec did not hand over a terminal")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


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
    console_dir = tempfile.mkdtemp(prefix="cl-exec-") if tty else None  # AF_UNIX paths must be short
    argv = [*runc_argv, "exec", "--pid-file", str(pid_file)]
    listener = None
    proc: trio.Process | None = None
    tty_stream: trio.lowlevel.FdStream | None = None
    try:
        if console_dir is not None:
            socket_path = os.path.join(console_dir, "console.sock")
            listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await listener.bind(socket_path)
            listener.listen(1)
            argv += ["--tty", "--console-socket", socket_path]
        argv += [container_id, *args]
        proc = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE if stdin and not tty else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if tty else subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if listener is not None:
            try:
                fd = await _receive_console(listener, proc)
            except RuncFailed:
                detail = b""
                assert proc.stderr is not None
                with trio.move_on_after(1):
                    while len(detail) < _STDERR_KEEP and (data := await proc.stderr.receive_some(_STDERR_KEEP)):
                        detail += data
                raise RuncFailed(
                    f"runc exec in {container_id} failed: {detail.decode(errors='replace').strip()[-500:]}",
                    id=container_id,
                ) from None
            os.set_blocking(fd, False)
            tty_stream = trio.lowlevel.FdStream(fd)  # owns fd now
            session = RuncExecSession(proc, tty_stream, fd)
            session.resize(rows, cols)
            async with trio.open_nursery() as nursery:
                # runc's own stderr (its errors) must be drained or runc could block on it
                nursery.start_soon(_drain, proc.stderr)
                yield session
                nursery.cancel_scope.cancel()
        else:
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
                _kill_exec_process(pid_file)
                proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
            if tty_stream is not None:
                await tty_stream.aclose()
            if listener is not None:
                listener.close()
            if console_dir is not None:
                shutil.rmtree(console_dir, ignore_errors=True)
            pid_file.unlink(missing_ok=True)


async def _drain(stream: trio.abc.ReceiveStream | None) -> None:
    if stream is not None:
        while await stream.receive_some(CHUNK):
            pass
