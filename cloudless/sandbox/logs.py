"""Container logs: timestamped records in size-rotated segments, and the log shim.

On disk a container's log is a directory of segments named by the absolute
stream offset of their first byte (`00000000000000004096.log`), like Kafka
segments. Each line is one JSON record `{"ts": float, "s": "o"|"e", "t": text}`.
A record's offset is its byte position in the concatenation of every segment
ever written, so `read(since_offset)` and `follow()` stay meaningful across
rotations and across restarts of the container (the writer appends to the last
segment). Rotation starts a new segment once the current one would exceed
`max_bytes` and deletes the oldest beyond `keep`. Log lines are not fsynced:
they are observations, not acknowledged writes.

The same file is **the log shim** (see runc.py for why one exists). runc.py
runs it by path with `python -I -S logs.py shim ...` (a frozen bundle: through a
hidden argument, see cloudless/selfexec.py), so at module level this
file imports only the standard library, and the shim path only C builtins: an
isolated interpreter with no site packages starts in ~7 ms instead of ~100 ms,
and the shim sits on the start path. The shim:

1. (when pre-started) waits for its arguments on stdin, NUL-separated;
2. forks; the parent relays the child's one-line report and exits, so the
   caller reaps it at once and the child outlives the node process;
3. the child calls setsid() and becomes a child subreaper, runs
   `runc create` with the container's stdout/stderr set to pipes it owns,
   then `runc start`, and reports `ok <pid>` (or `error <why>`);
4. the container's init, re-parented to the shim, is reaped with waitpid
   (exact exit code, 128+signal) while the pipes are pumped into log
   segments; then the cgroup's OOM-kill counter is read and `exit.json`
   written atomically (fsynced).
"""

from __future__ import annotations

import os
import time
from _json import encode_basestring_ascii as _json_string  # C builtin: no `re`, no `json` package

if __name__ != "__main__":  # imported as a module; the shim skips these (start latency)
    import json
    from collections.abc import AsyncIterator

    import trio

    from cloudless.sandbox.runtime import LogRecord

SEGMENT_SUFFIX = ".log"
MAX_LINE = 16 * 1024  # longer lines are split into several records
_STREAM_CODE = {"stdout": "o", "stderr": "e"}
_STREAM_NAME = {"o": "stdout", "e": "stderr"}


def _segments(log_dir: str) -> list[tuple[int, str]]:
    """(start offset, path) of every segment, oldest first."""
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        stem = name[: -len(SEGMENT_SUFFIX)]
        if name.endswith(SEGMENT_SUFFIX) and stem.isdigit():
            out.append((int(stem), os.path.join(log_dir, name)))
    out.sort()
    return out


def _segment_name(start: int) -> str:
    return f"{start:020d}{SEGMENT_SUFFIX}"


class LogWriter:
    """Appends records to the newest segment, rotating by size."""

    def __init__(self, log_dir: str, max_bytes: int = 10 * 1024 * 1024, keep: int = 3) -> None:
        if max_bytes < 256 or keep < 1:
            raise ValueError("max_bytes >= 256 and keep >= 1")
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self.keep = keep
        os.makedirs(log_dir, exist_ok=True)
        segs = _segments(log_dir)
        if segs:
            self._start, path = segs[-1]
            self._size = os.path.getsize(path)
        else:
            self._start, self._size = 0, 0
        self._fd = self._open(self._start)

    def _open(self, start: int) -> int:
        path = os.path.join(self.log_dir, _segment_name(start))
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    @property
    def offset(self) -> int:
        """Offset the next record will get."""
        return self._start + self._size

    def write(self, ts: float, stream: str, text: str) -> int:
        """Append one record; return its offset."""
        line = f'{{"ts": {ts:.6f}, "s": "{_STREAM_CODE[stream]}", "t": {_json_string(text)}}}\n'.encode()
        if self._size and self._size + len(line) > self.max_bytes:
            try:
                self._rotate()
            except OSError:
                pass  # cannot start a segment (directory gone, disk full): keep the current one
        offset = self.offset
        os.write(self._fd, line)
        self._size += len(line)
        return offset

    def _rotate(self) -> None:
        new_fd = self._open(self._start + self._size)  # first, so a failure changes nothing
        os.close(self._fd)
        self._fd = new_fd
        self._start += self._size
        self._size = 0
        segs = _segments(self.log_dir)
        for _, path in segs[: max(0, len(segs) - self.keep)]:
            os.unlink(path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LineSplitter:
    """Turns a byte stream into text lines; a final partial line comes out on flush()."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        lines = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) >= MAX_LINE:
                    lines.append(self._buf[:MAX_LINE].decode("utf-8", "replace"))
                    self._buf = self._buf[MAX_LINE:]
                    continue
                break
            line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
            while len(line) > MAX_LINE:
                lines.append(line[:MAX_LINE].decode("utf-8", "replace"))
                line = line[MAX_LINE:]
            lines.append(line.decode("utf-8", "replace"))
        return lines

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, b""
        return [rest.decode("utf-8", "replace")] if rest else []


def _parse_lines(data: bytes, base: int) -> tuple[list[tuple[int, float, str, str]], int]:
    """Complete records in `data` (which starts at offset `base`) and the bytes consumed."""
    out = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        raw = data[pos:nl]
        try:
            obj = json.loads(raw)
            out.append((base + pos, float(obj["ts"]), _STREAM_NAME[obj["s"]], str(obj["t"])))
        except (ValueError, KeyError, TypeError):
            pass  # a torn record from a crash mid-write: skip it, keep the rest
        pos = nl + 1
    return out, pos


def _scan(log_dir: str, since_offset: int) -> tuple[list[tuple[int, float, str, str]], int]:
    """Complete records at or after `since_offset`, and the offset just past the last one.

    If `since_offset` points into a segment already rotated away, reading starts
    at the oldest record still kept.
    """
    out: list[tuple[int, float, str, str]] = []
    next_offset = since_offset
    segs = _segments(log_dir)
    for i, (start, path) in enumerate(segs):
        end_bound = segs[i + 1][0] if i + 1 < len(segs) else None
        if end_bound is not None and end_bound <= since_offset:
            continue
        try:
            with open(path, "rb") as f:
                skip = max(0, since_offset - start)
                f.seek(skip)
                data = f.read()
        except FileNotFoundError:
            continue  # rotated away while we listed
        records, used = _parse_lines(data, start + skip)
        out.extend(records)
        next_offset = start + skip + used
    return out, next_offset


def read_raw(log_dir: str, since_offset: int = 0, tail: int | None = None) -> list[tuple[int, float, str, str]]:
    """Records at or after `since_offset` as (offset, ts, stream, text); only the last `tail` if given."""
    out, _ = _scan(log_dir, since_offset)
    if tail is not None:
        out = out[-tail:] if tail > 0 else []
    return out


def read(log_dir: str, since_offset: int = 0, tail: int | None = None) -> list[LogRecord]:
    return [LogRecord(offset=o, ts=t, stream=s, text=x) for o, t, s, x in read_raw(log_dir, since_offset, tail)]


def read_tail(log_dir: str, tail: int) -> tuple[list[LogRecord], int]:
    """The last `tail` records and the offset just past the newest complete one, from one scan:
    following from that offset misses nothing written after the scan and repeats nothing."""
    out, next_offset = _scan(log_dir, 0)
    out = out[-tail:] if tail > 0 else []
    return [LogRecord(offset=o, ts=t, stream=s, text=x) for o, t, s, x in out], next_offset


async def follow(log_dir: str, since_offset: int = 0, poll_interval: float = 0.05) -> AsyncIterator[LogRecord]:
    """Yield records from `since_offset` on as they are written, across rotations.

    Polls (inotify is not portable to every device this runs on). Ends when the
    log directory is removed (the container was deleted); otherwise the caller
    ends it by cancelling or by leaving the `async for`.
    """
    offset = since_offset
    while True:
        records, offset = _scan(log_dir, offset)
        for o, t, s, x in records:
            yield LogRecord(offset=o, ts=t, stream=s, text=x)
        if not records:
            if not await trio.Path(log_dir).is_dir():  # the container was deleted
                return
            await trio.sleep(poll_interval)


# ---------------------------------------------------------------- the shim


def _memory_cgroup_dir(pid: int) -> str | None:
    """Host path of the memory cgroup `pid` is in (v1 memory controller, else v2)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return "/sys/fs/cgroup/memory" + path
    for line in lines:
        if line.startswith("0::"):
            return "/sys/fs/cgroup" + line[3:]
    return None


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def oom_kill_count(cgroup_dir: str | None) -> int:
    """The cgroup's oom_kill counter (v1 memory.oom_control, v2 memory.events), 0 if unknown."""
    if not cgroup_dir:
        return 0
    for name in ("memory.oom_control", "memory.events"):
        try:
            with open(os.path.join(cgroup_dir, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return 0


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _json_object(fields: dict) -> str:
    """A flat JSON object of str/int/float/bool/None values, without importing json."""
    parts = []
    for key, value in fields.items():
        if value is None:
            v = "null"
        elif isinstance(value, bool):
            v = "true" if value else "false"
        elif isinstance(value, (int, float)):
            v = repr(value)
        else:
            v = _json_string(str(value))
        parts.append(f"{_json_string(key)}: {v}")
    return "{" + ", ".join(parts) + "}"


SHIM_OPTIONS = ("runc", "root", "bundle", "id", "log-dir", "max-bytes", "keep", "exit-file", "pid-file",
                "shim-log", "shim-pid-file")  # fmt: skip


def _parse_shim_args(argv: list[str]) -> dict[str, str]:
    if len(argv) % 2:
        raise SystemExit("shim: options come in --name value pairs")
    opts = {}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        name = flag[2:]
        if not flag.startswith("--") or name not in SHIM_OPTIONS:
            raise SystemExit(f"shim: unknown option {flag}")
        opts[name] = value
    missing = [o for o in SHIM_OPTIONS if o not in opts]
    if missing:
        raise SystemExit(f"shim: missing --{missing[0]}")
    return opts


class _ShimOptions:
    def __init__(self, o: dict[str, str]) -> None:
        self.runc, self.root, self.bundle, self.id = o["runc"], o["root"], o["bundle"], o["id"]
        self.log_dir, self.exit_file, self.pid_file = o["log-dir"], o["exit-file"], o["pid-file"]
        self.shim_log, self.shim_pid_file = o["shim-log"], o["shim-pid-file"]
        self.max_bytes, self.keep = int(o["max-bytes"]), int(o["keep"])


def _read_args_from_stdin() -> list[str] | None:
    """A pre-started shim's arguments: one NUL-separated line; None at EOF (not needed)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            return None
        data += chunk
    return data[:-1].decode().split("\0")


def _shim_main(argv: list[str]) -> int:
    # Only C builtins beyond os/time: argparse, subprocess, signal and json would
    # add tens of milliseconds to every container start.
    import _signal as signal
    import ctypes  # for prctl; loaded before the arguments arrive when pre-started
    import select

    libc = ctypes.CDLL(None, use_errno=True)
    if argv == ["--args-from-stdin"]:
        # Pre-started ("warm") by the runtime so interpreter start-up is off the start path.
        got = _read_args_from_stdin()
        if got is None:
            return 0
        argv = got
    a = _ShimOptions(_parse_shim_args(argv))

    ready_r, ready_w = os.pipe()
    if os.fork() != 0:
        os.close(ready_w)
        chunks = []
        while True:
            chunk = os.read(ready_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        report = b"".join(chunks).decode("utf-8", "replace")
        os.write(1, report.encode() or b"error shim died before reporting\n")
        # The caller waits for our exit: skip interpreter teardown, it is on the start path.
        os._exit(0 if report.startswith("ok ") else 1)
    os.close(ready_r)
    os.setsid()
    # pid plus kernel start time: the runtime's liveness check must not be fooled by pid reuse.
    # Not fsynced: after a machine crash the shim is gone anyway.
    with open(a.shim_pid_file, "w") as f:
        f.write(f"{os.getpid()} {process_start_time(os.getpid())}")
    devnull = os.open(os.devnull, os.O_RDWR)
    log_fd = os.open(a.shim_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)

    def shim_log(event: str, **fields: object) -> None:
        os.write(2, (_json_object({"ts": time.time(), "event": event, **fields}) + "\n").encode())

    def report(text: str) -> None:
        os.write(ready_w, (text.rstrip("\n") + "\n").encode())
        os.close(ready_w)

    PR_SET_CHILD_SUBREAPER = 36  # not inherited across fork: set it here, in the daemon
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        report(f"error prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")
        return 1

    # SIGCHLD wakes the select loops through the wakeup fd; the handler itself does nothing.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the shim lives until the container dies
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def run_runc(args: list[str], out_fd: int, err_fd: int, timeout: float = 60.0) -> int:
        """Run runc to completion (killed after `timeout`); its exit code, -1 if it could not run."""
        try:
            child = os.posix_spawn(
                a.runc,
                [a.runc, "--root", a.root, *args],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, out_fd, 1),
                    (os.POSIX_SPAWN_DUP2, err_fd, 2),
                ],
            )
        except OSError as e:
            shim_log("runc_spawn_failed", args=" ".join(args), error=str(e))
            return -1
        deadline = time.monotonic() + timeout
        while True:
            got, st = os.waitpid(child, os.WNOHANG)
            if got:
                return os.waitstatus_to_exitcode(st)
            if time.monotonic() > deadline:
                os.kill(child, 9)
                os.waitpid(child, 0)
                shim_log("runc_timeout", args=" ".join(args))
                return -1
            select.select([wake_r], [], [], 0.05)
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass

    def drain(fds: tuple[int, ...]) -> str:
        msg = b""
        for fd in fds:
            os.set_blocking(fd, False)
            try:
                msg += os.read(fd, 65536)
            except BlockingIOError:
                pass
        return msg.decode("utf-8", "replace").replace("\n", " ").strip()

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    spawn_at = time.monotonic()
    # runc create passes its stdio on to the container's init: these pipes are its stdout/stderr.
    # (Two commands, not `runc run --detach`: measured here, run -d is ~15% slower.)
    rc = run_runc(["create", "--bundle", a.bundle, "--pid-file", a.pid_file, a.id], out_w, err_w)
    created_at = time.monotonic()
    os.close(out_w)
    os.close(err_w)
    if rc != 0:
        # No container: every writer of the pipes is gone, so reads reach EOF.
        report(f"error runc create exit {rc}: {drain((err_r, out_r))}")
        return 1
    with open(a.pid_file) as f:
        pid = int(f.read().strip())
    cgroup = _memory_cgroup_dir(pid)
    oom_before = oom_kill_count(cgroup)
    start_err_r, start_err_w = os.pipe()
    rc = run_runc(["start", a.id], devnull, start_err_w)
    os.close(start_err_w)
    if rc != 0:
        message = drain((start_err_r,))
        run_runc(["delete", "--force", a.id], devnull, devnull)
        report(f"error runc start exit {rc}: {message}")
        return 1
    os.close(start_err_r)
    report(f"ok {pid}")
    shim_log(
        "container_started",
        id=a.id,
        pid=pid,
        memory_cgroup=cgroup,
        runc_create_s=round(created_at - spawn_at, 4),
        runc_start_s=round(time.monotonic() - created_at, 4),
    )

    writer = LogWriter(a.log_dir, a.max_bytes, a.keep)
    dropped = 0

    def record(ts: float, stream: str, line: str) -> None:
        # The pipes must keep draining whatever happens to the log files, or the
        # container blocks on a full pipe; a line that cannot be stored is counted.
        nonlocal dropped
        try:
            writer.write(ts, stream, line)
        except OSError as e:
            if dropped == 0:
                shim_log("log_write_failed", error=str(e))
            dropped += 1

    splitters = {out_r: ("stdout", LineSplitter()), err_r: ("stderr", LineSplitter())}
    open_fds = {out_r, err_r}
    status: int | None = None
    drain_deadline: float | None = None
    while open_fds:
        timeout = None
        if status is not None:
            # Init is gone; stragglers holding the pipes get 2 s, then we stop reading.
            timeout = max(0.0, drain_deadline - time.monotonic())
            if timeout == 0:
                break
        try:
            ready, _, _ = select.select([*open_fds, wake_r], [], [], timeout)
        except InterruptedError:
            continue
        now = time.time()
        for fd in ready:
            if fd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            data = os.read(fd, 65536)
            stream, splitter = splitters[fd]
            if not data:
                open_fds.discard(fd)
                lines = splitter.flush()
            else:
                lines = splitter.feed(data)
            for line in lines:
                record(now, stream, line)
        while status is None:
            try:
                got, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                got, st = pid, 255 << 8  # lost the child: report failure rather than hang
            if got == 0:
                break
            if got == pid:
                status = st
                drain_deadline = time.monotonic() + 2.0
    if status is None:
        # Both pipes closed before init exited (it closed its stdio): just wait.
        while True:
            try:
                got, st = os.waitpid(-1, 0)
            except ChildProcessError:
                got, st = pid, 255 << 8
            if got == pid:
                status = st
                break
    for stream, splitter in splitters.values():
        for line in splitter.flush():
            record(time.time(), stream, line)
    writer.close()
    code = os.waitstatus_to_exitcode(status)
    exit_code = code if code >= 0 else 128 - code
    oom_after = oom_kill_count(cgroup)
    verdict = {
        "exit_code": exit_code,
        "oom_killed": oom_after > oom_before,
        "finished_at": time.time(),
        "pid": pid,
        "dropped_log_lines": dropped,
    }
    try:
        _write_atomic(a.exit_file, _json_object(verdict).encode())
    except OSError as e:  # the container directory was deleted under us
        shim_log("exit_record_failed", error=str(e))
    shim_log("container_exited", id=a.id, **verdict)
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "shim":
        sys.stderr.write("usage: logs.py shim --runc ... (started by cloudless.sandbox.runc)\n")
        raise SystemExit(2)
    raise SystemExit(_shim_main(sys.argv[2:]))
