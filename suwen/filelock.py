"""The one lock Suwen takes against a second process doing the same work: a non-blocking
``flock`` on a lock file, refused in one line. `suwen batch` and `suwen eval` hold it on the JSONL
files they append to (:func:`single_writer`), index builds on their index (``store.build_lock``).
The kernel drops the lock when its holder dies, however it dies, so nothing stale is left."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from suwen.errors import InputError


@contextmanager
def exclusive(lock_file: Path, refusal: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created owner-only) for the block; when another
    process holds it, raise :class:`InputError` with ``refusal`` instead of waiting."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(refusal) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def waited(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created owner-only) for the block, waiting as
    long as another process holds it."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_free(lock_file: Path) -> bool:
    """Whether no process holds ``lock_file`` (an existing lock file; a missing one is not
    free: nothing can be said of it)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases the lock if it was taken
    return True


@contextmanager
def single_writer(path: Path, command: str) -> Iterator[None]:
    """One writer for ``path`` (locked through ``path.lock``) for the block; another process
    already writing it is refused in one line naming the file and ``command``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    refusal = f"{path}: another {command} is writing this file"
    with exclusive(path.with_name(path.name + ".lock"), refusal):
        yield
