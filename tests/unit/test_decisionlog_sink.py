"""The decision log's sink (fleetgate.runtime.audit): rotation, reopen, failure and recovery."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from fleetgate.runtime.audit import AuditSink, AuditUnavailable, FileTarget


def test_rotation_keeps_backups_and_never_splits_a_line(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    t = FileTarget(str(path), max_bytes=100, backups=2)
    t.open()
    for i in range(40):
        t.write(f"line-{i:03d}-{'x' * 20}\n".encode())  # 30 bytes: 3 per file
    t.close()
    files = [path, Path(f"{path}.1"), Path(f"{path}.2")]
    assert not Path(f"{path}.3").exists()
    got = [ln for f in reversed(files) for ln in f.read_text().splitlines()]
    assert all(0 < f.stat().st_size <= 100 for f in files)
    assert got == [f"line-{i:03d}-{'x' * 20}" for i in range(40 - len(got), 40)]
    assert len(got) == 7  # 40 = 13 full files of 3 + 1: the current 1, two backups of 3


def test_zero_backups_restarts_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    t = FileTarget(str(path), max_bytes=50, backups=0)
    for i in range(5):
        t.write(f"{i}{'y' * 19}\n".encode())
    assert path.read_text().splitlines() == [f"4{'y' * 19}"]
    assert list(tmp_path.iterdir()) == [path]


def test_a_moved_or_deleted_file_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    t = FileTarget(str(path))
    t.write(b"a\n")
    os.rename(path, tmp_path / "old")
    t.write(b"b\n")
    path.unlink()
    t.write(b"c\n")
    assert (tmp_path / "old").read_text() == "a\n"
    assert path.read_text() == "c\n"


def test_reopen_on_request(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    t = FileTarget(str(path))
    t.write(b"a\n")
    os.link(path, tmp_path / "hard")  # same inode: not "moved", only a reopen notices
    path.unlink()
    os.link(tmp_path / "hard", path)
    t.reopen()
    t.write(b"b\n")
    assert path.read_text() == "a\nb\n"


def test_full_device_fails_loudly_then_recovers(tmp_path: Path) -> None:
    link = tmp_path / "d.log"
    link.symlink_to("/dev/full")
    t = FileTarget(str(link))
    with pytest.raises(OSError):
        t.write(b"lost\n")
    link.unlink()
    t.write(b"kept\n")
    assert link.read_text() == "kept\n"


def test_a_partial_line_is_cut_off_before_the_next(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    t = FileTarget(str(path))
    t.write(b"whole\n")
    with open(path, "ab") as f:  # what a write cut short by ENOSPC leaves behind
        f.write(b"{\"half")
    t._dirty = True  # set by a failed os.write (ENOSPC cannot be had on tmp)
    t.write(b"next\n")
    assert path.read_text() == "whole\nnext\n"


def test_sink_reports_failure_and_recovery(tmp_path: Path) -> None:
    link = tmp_path / "d.log"
    link.symlink_to(tmp_path / "a.log")
    states: list[tuple[bool, str | None]] = []
    errors: list[int] = []
    sink = AuditSink([FileTarget(str(link))], on_state=lambda ok, c: states.append((ok, c)),
                     on_write_error=lambda: errors.append(1))
    try:
        asyncio.run(sink.write("one", 2))
        assert sink.status()["ok"] is True
        link.unlink()
        link.symlink_to("/dev/full")
        with pytest.raises(AuditUnavailable, match="No space left"):
            asyncio.run(sink.write("two", 2))
        assert sink.submit("three").exception(2) is not None
        st = sink.status()
        assert st["ok"] is False and "No space left" in st["error"] and st["write_errors"] == 2
        link.unlink()
        link.symlink_to(tmp_path / "b.log")
        asyncio.run(sink.write("four", 2))
        assert sink.status()["ok"] is True
    finally:
        sink.close()
    assert [ok for ok, _ in states] == [False, True] and len(errors) == 2
    assert (tmp_path / "a.log").read_text() == "one\n"
    assert (tmp_path / "b.log").read_text() == "four\n"


class SlowTarget:
    name = "slow"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.gate.wait(5)
        self.lines.append(data)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_slow_disk_bounds_the_wait_and_the_queue() -> None:
    slow = SlowTarget()
    sink = AuditSink([slow], queue_max=2)
    try:
        with pytest.raises(AuditUnavailable, match=r"within 0\.05 s"):
            asyncio.run(sink.write("a", 0.05))  # the writer holds "a"; the caller gives up
        sink.submit("b")
        sink.submit("c")
        full = sink.submit("d")  # the queue holds b, c: d is refused at once, not waited on
        assert isinstance(full.exception(0), AuditUnavailable)
        assert sink.status()["ok"] is False
    finally:
        slow.gate.set()
        sink.close()
    assert b"".join(slow.lines) == b"a\nb\nc\n"  # queued lines still written, in order
