"""Log segments: records, offsets, size rotation, read from a position / tail, follow across rotations."""

import json
import os
from pathlib import Path

import trio

from cloudless.sandbox import logs
from cloudless.sandbox.logs import LineSplitter, LogWriter, oom_kill_count
from tests.harness.waiting import wait_until


def test_records_have_timestamps_streams_and_increasing_offsets(tmp_path):
    w = LogWriter(str(tmp_path), max_bytes=1 << 20, keep=2)
    o1 = w.write(100.5, "stdout", "hello")
    o2 = w.write(101.0, "stderr", "oops")
    w.close()
    recs = logs.read(str(tmp_path))
    assert [(r.offset, r.ts, r.stream, r.text) for r in recs] == [
        (o1, 100.5, "stdout", "hello"),
        (o2, 101.0, "stderr", "oops"),
    ]
    assert o1 == 0 and o2 > o1


def test_read_since_offset_and_tail(tmp_path):
    w = LogWriter(str(tmp_path), max_bytes=1 << 20, keep=2)
    offsets = [w.write(float(i), "stdout", f"line {i}") for i in range(10)]
    assert [r.text for r in logs.read(str(tmp_path), since_offset=offsets[7])] == ["line 7", "line 8", "line 9"]
    assert [r.text for r in logs.read(str(tmp_path), tail=2)] == ["line 8", "line 9"]
    assert logs.read(str(tmp_path), tail=0) == []
    assert logs.read(str(tmp_path), since_offset=w.offset) == []


async def test_read_tail_then_follow_from_its_offset_gives_only_newer_records(tmp_path, autojump_clock):
    # docker's `logs -f --tail N`: the last N, then what comes after them, nothing twice, nothing older
    w = LogWriter(str(tmp_path), max_bytes=1 << 20, keep=2)
    for i in range(10):
        w.write(float(i), "stdout", f"line {i}")
    for tail, want in ((0, []), (2, ["line 8", "line 9"]), (50, [f"line {i}" for i in range(10)])):
        records, since = logs.read_tail(str(tmp_path), tail)
        assert [r.text for r in records] == want
        assert since == w.offset
    w.write(10.0, "stdout", "line 10")
    async for rec in logs.follow(str(tmp_path), since_offset=since):
        assert rec.text == "line 10"
        break


def test_rotation_by_size_keeps_n_segments_and_offsets_stay_global(tmp_path):
    w = LogWriter(str(tmp_path), max_bytes=300, keep=3)
    offsets = [w.write(1.0, "stdout", f"record number {i:04d}") for i in range(100)]
    w.close()
    segs = sorted(os.listdir(tmp_path))
    assert len(segs) == 3
    for name in segs:
        assert os.path.getsize(tmp_path / name) <= 300
        assert int(name.split(".")[0]) in offsets  # named by the offset of their first record
    recs = logs.read(str(tmp_path))
    assert recs[-1].text == "record number 0099" and recs[-1].offset == offsets[-1]
    # contiguous, no gaps inside what is kept
    texts = [r.text for r in recs]
    first = int(texts[0].split()[-1])
    assert texts == [f"record number {i:04d}" for i in range(first, 100)]
    # a position that was rotated away starts at the oldest kept record
    assert logs.read(str(tmp_path), since_offset=0)[0].text == texts[0]


def test_writer_appends_to_last_segment_after_reopen(tmp_path):
    w = LogWriter(str(tmp_path), max_bytes=1 << 20, keep=2)
    w.write(1.0, "stdout", "first run")
    w.close()
    w2 = LogWriter(str(tmp_path), max_bytes=1 << 20, keep=2)
    off = w2.write(2.0, "stdout", "second run")
    w2.close()
    recs = logs.read(str(tmp_path))
    assert [r.text for r in recs] == ["first run", "second run"] and recs[1].offset == off


def test_torn_last_line_is_not_returned_until_complete(tmp_path):
    w = LogWriter(str(tmp_path), max_bytes=1 << 20, keep=2)
    w.write(1.0, "stdout", "whole")
    w.close()
    (seg,) = os.listdir(tmp_path)
    with open(tmp_path / seg, "ab") as f:
        f.write(b'{"ts": 2.0, "s": "o", "t": "half')
    assert [r.text for r in logs.read(str(tmp_path))] == ["whole"]


def test_line_splitter_handles_partial_long_and_invalid_utf8():
    s = LineSplitter()
    assert s.feed(b"ab") == []
    assert s.feed(b"c\nde\n\nf") == ["abc", "de", ""]
    assert s.flush() == ["f"]
    big = b"x" * (logs.MAX_LINE * 2 + 5)
    out = s.feed(big + b"\n")
    assert [len(x) for x in out] == [logs.MAX_LINE, logs.MAX_LINE, 5]
    assert s.feed(b"\xff\xfeok\n") == ["\ufffd\ufffdok"]


async def test_follow_yields_new_records_across_rotations(tmp_path, autojump_clock):
    w = LogWriter(str(tmp_path), max_bytes=300, keep=10)
    w.write(1.0, "stdout", "before")
    got = []

    async def reader():
        async for rec in logs.follow(str(tmp_path), since_offset=0):
            got.append(rec.text)
            if len(got) == 41:
                return

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        for i in range(40):
            await trio.sleep(0.1)
            w.write(2.0, "stderr", f"live line {i:03d}")
    assert got == ["before"] + [f"live line {i:03d}" for i in range(40)]
    assert len(os.listdir(tmp_path)) > 3  # it really rotated while following


def test_oom_kill_count_reads_v1_and_v2_files(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert oom_kill_count(str(tmp_path / "v1")) == 2
    assert oom_kill_count(str(tmp_path / "v2")) == 1
    assert oom_kill_count(str(tmp_path / "missing")) == 0
    assert oom_kill_count(None) == 0


async def test_shim_reports_runc_create_failure_and_leaves_no_daemon(tmp_path):
    """The shim relays a failing `runc create` as `error ...` with runc's message."""
    fake = tmp_path / "runc"
    fake.write_text("#!/bin/sh\necho 'container config invalid' >&2\nexit 1\n")
    fake.chmod(0o755)
    import sys

    argv = [sys.executable, "-I", "-S", logs.__file__, "shim", "--runc", str(fake), "--root", str(tmp_path),
            "--bundle", str(tmp_path), "--id", "c1", "--log-dir", str(tmp_path / "logs"), "--max-bytes", "4096",
            "--keep", "2", "--exit-file", str(tmp_path / "exit.json"), "--pid-file", str(tmp_path / "init.pid"),
            "--shim-log", str(tmp_path / "shim.log"), "--shim-pid-file", str(tmp_path / "shim.pid")]  # fmt: skip
    with trio.fail_after(20):
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 1
    assert proc.stdout.decode().startswith("error runc create exit 1")
    assert "container config invalid" in proc.stdout.decode()
    assert not (tmp_path / "exit.json").exists()
    shim_pid = int((tmp_path / "shim.pid").read_text().split()[0])

    def shim_gone() -> bool:
        try:
            state = Path(f"/proc/{shim_pid}/stat").read_text().split(")")[1][:3]
        except OSError:  # gone (ENOENT, or ESRCH while it is being reaped)
            return True
        return "Z" in state  # a zombie has exited; only its parent's reaping is left

    with trio.fail_after(5):
        await wait_until(shim_gone, interval=0.02)


def test_records_are_json_lines(tmp_path):
    w = LogWriter(str(tmp_path), max_bytes=1 << 20, keep=2)
    w.write(3.25, "stderr", 'quote " and \\ and \t tab')
    w.close()
    (seg,) = os.listdir(tmp_path)
    line = (tmp_path / seg).read_text()
    assert json.loads(line) == {"ts": 3.25, "s": "e", "t": 'quote " and \\ and \t tab'}


async def test_follow_ends_when_the_log_directory_is_removed(tmp_path):
    # Real time: follow() checks the directory in a worker thread, and an
    # autojump clock would race its virtual deadline past that thread under load.
    import shutil

    d = tmp_path / "logs"
    w = LogWriter(str(d), max_bytes=1 << 20, keep=2)
    w.write(1.0, "stdout", "last words")
    w.close()
    got = []

    async def reader():
        async for rec in logs.follow(str(d)):
            got.append(rec.text)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(0.2)
        shutil.rmtree(d)
        with trio.fail_after(5):
            await wait_until(lambda: not n.child_tasks, interval=0.1)
    assert got == ["last words"]


def test_writer_keeps_writing_when_rotation_is_impossible(tmp_path, monkeypatch):
    w = LogWriter(str(tmp_path), max_bytes=300, keep=2)
    w.write(1.0, "stdout", "x" * 200)

    def no_new_segment(start):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w, "_open", no_new_segment)
    off = w.write(2.0, "stdout", "y" * 200)  # rotation fails; the record still lands
    w.close()
    assert [r.text for r in logs.read(str(tmp_path))] == ["x" * 200, "y" * 200]
    assert logs.read(str(tmp_path))[1].offset == off
