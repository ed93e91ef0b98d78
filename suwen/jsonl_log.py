"""The append-only JSONL log `suwen batch` and `suwen eval` write as questions finish, and resume
from.

One writer per file (:func:`suwen.filelock.single_writer`; a second run is refused in one line).
Each record is one line, written whole with ``write`` on an ``O_APPEND`` descriptor and fsynced
before the caller counts the question as done, so a process killed at any moment (SIGKILL
included) loses at most the line it was writing: the next run finds a final line without its
newline, drops it, and asks that question again. The file is owner-only (0600): its lines hold
questions and answers about patients.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from suwen.filelock import single_writer
from suwen.files import PRIVATE_FILE_MODE, atomic_write_bytes


@dataclass(frozen=True)
class LogContents:
    """The complete lines of a log (without their newlines), and whether it ended in a torn
    line (a write cut off by a kill), which is not among them."""

    lines: list[bytes]
    torn_tail: bool = False


def split_log(data: bytes) -> LogContents:
    """The complete lines of ``data``; a last line without its newline is left out."""
    lines = data.split(b"\n")
    torn_tail = lines.pop() != b""  # after the last newline: b"" when the file ends cleanly
    return LogContents(lines, torn_tail)


def read_log(path: Path) -> LogContents:
    """What ``path`` holds (nothing when it does not exist), read without changing it."""
    try:
        return split_log(path.read_bytes())
    except FileNotFoundError:
        return LogContents([])


class AppendLog:
    """A log open for appending by this process alone (see :func:`open_append_log`)."""

    def __init__(self, path: Path, found: LogContents) -> None:
        self.path = path
        self.found = found
        self._lock = threading.Lock()
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)

    def append(self, line: str) -> None:
        """Append ``line`` (one JSON document, no newline) and return once it is on disk.
        Safe from several threads: lines never interleave."""
        data = (line + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)

    def rewrite(self, lines: list[bytes]) -> None:
        """Replace the log's content by ``lines`` atomically (to drop lines the run will write
        again); later appends go to the new file."""
        with self._lock:
            atomic_write_bytes(self.path, b"".join(line + b"\n" for line in lines))
            os.close(self._fd)
            self._fd = self._open()

    def close(self) -> None:
        os.close(self._fd)


@contextmanager
def open_append_log(path: Path, command: str) -> Iterator[AppendLog]:
    """Lock ``path`` against a second writer (``command`` names this run in the refusal), read
    what it holds, drop a torn final line from the file, and open it for appending."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with single_writer(path, command):
        found = read_log(path)
        log = AppendLog(path, found)
        try:
            if found.torn_tail:
                log.rewrite(found.lines)
            yield log
        finally:
            log.close()
