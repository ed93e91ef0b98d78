"""Content digests of the files Suwen keys things by: an image in an index, a question's image
in the leakage guard, a saved transcript, a model's config. One function, so the image index
and the leakage guard always agree on what "the same image" means.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from suwen.errors import InputError

_BLOCK_BYTES = 1 << 20


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes. For a folder (a DICOM series): of each file directly in
    it, in name order, as its name, a NUL byte and its bytes -- so a copy of the series hashes
    the same wherever it lies, while a renamed, added or changed slice gives another digest.

    An unreadable path is refused in one line naming it."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            for file in sorted(p for p in path.iterdir() if p.is_file()):
                digest.update(file.name.encode() + b"\0")
                for block in _blocks(file):
                    digest.update(block)
        else:
            for block in _blocks(path):
                digest.update(block)
    except OSError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise InputError(f"{path}: cannot read: {reason}") from exc
    return digest.hexdigest()


def _blocks(file: Path) -> Iterator[bytes]:
    with file.open("rb") as handle:
        yield from iter(lambda: handle.read(_BLOCK_BYTES), b"")
