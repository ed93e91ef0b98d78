"""Whole-file writes, the one way Suwen writes a file a user or another process reads.

A file is written to a temporary name beside its target, flushed and fsynced, renamed over the
target, and the directory fsynced: a reader never sees half a file, a crash or a kill at any
moment leaves the previous file or the new one, never a mix. Every file is owner-only (0600)
from its first byte, whatever the umask: what Suwen writes can describe a patient.

A folder written as a whole (an exported encoder, the demo's cases, a tiny model) is built in a
staging folder beside its target and published with :func:`publish_dir`; a large one in a
:func:`held_staging` folder, which the next writer removes if its writer was killed before it
could. Index versions are
published by ``suwen.indexes.store`` (a ``CURRENT`` pointer besides the rename) with the same
fsync helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from suwen.filelock import exclusive, is_free

PRIVATE_FILE_MODE = 0o600
# A staging folder with no lock file beside it is its writer's only between mkdtemp and
# taking the lock; one older than this was left by a writer killed in that instant.
UNLOCKED_STAGING_SECONDS = 600.0


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (any descriptor of the file will do on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable: a rename is on disk only after this."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file and directory under ``path``, then ``path`` itself (before it is renamed into
    place, so nothing it holds is still only in the page cache when a reader can see it)."""
    for item in sorted(path.rglob("*")):
        if item.is_symlink():
            continue
        if item.is_file():
            fsync_file(item)
        elif item.is_dir():
            fsync_dir(item)
    fsync_dir(path)


def publish_dir(staging: Path, target: Path) -> None:
    """Rename a finished staging folder (beside ``target``, which must not exist or be an empty
    folder) to ``target``, durably: its contents are fsynced before the rename, the parent
    after it, so a crash leaves the staging folder or the complete target, never a partial
    one under the target's name."""
    fsync_tree(staging)
    staging.rename(target)
    fsync_dir(target.parent)


@contextmanager
def held_staging(parent: Path, prefix: str) -> Iterator[Path]:
    """A new private staging folder in ``parent`` (named ``prefix`` + a random part) for the
    block, removed when the block ends however it ends (a block that publishes it renames it
    first). While the block runs, its writer holds a lock file beside it; so staging folders
    of this ``prefix`` left by a writer that was killed (hundreds of MB for an exported
    encoder) are removed here first, and a live writer's are not."""
    for lock in parent.glob(f"{prefix}*.lock"):
        if is_free(lock):
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
    for left in parent.glob(f"{prefix}*"):
        unlocked = not left.with_name(left.name + ".lock").exists()
        if (
            left.is_dir()
            and unlocked
            and time.time() - left.stat().st_mtime > (UNLOCKED_STAGING_SECONDS)
        ):
            shutil.rmtree(left, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    lock = staging.with_name(staging.name + ".lock")
    try:
        with exclusive(lock, f"{staging}: in use"):
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A private temporary file beside ``path`` for the block to write (for writers that want a
    file name: FAISS, PIL, matplotlib, numpy); when the block ends it is made owner-only,
    fsynced and renamed over ``path``, and the directory fsynced. If the block raises, ``path``
    is untouched and the temporary file removed. The parent directory must exist."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # created 0600; writers that reopen it by name keep that mode
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(PRIVATE_FILE_MODE)  # in case a writer replaced the file instead
        fsync_file(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in UTF-8 (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any, *, indent: int = 2) -> None:
    """Replace ``path`` with ``data`` as indented UTF-8 JSON ending in a newline."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
