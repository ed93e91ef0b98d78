"""One writer per output file: the lock `suwen batch` and `suwen eval` take on the JSONL files
they append to, so a second run on the same file is refused instead of interleaving lines."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from suwen.errors import InputError


@contextmanager
def single_writer(path: Path, command: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (through ``path.lock``) for the block; another
    process already holding it is refused in one line naming the file and ``command``. The
    kernel drops the lock when its holder dies, however it dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{path}: another {command} is writing this file") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock
