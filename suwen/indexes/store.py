"""Where an index lives on disk, and how a new version replaces the old one atomically.

Layout: ``<home>/indexes/<name>/`` holds versions ``v000001/``, ``v000002/``, ... and a ``CURRENT``
file naming the live one. A build writes a new version directory completely (SQLite, FAISS, the
manifest), fsyncs it, and only then replaces ``CURRENT`` with ``os.replace``: a crash or Ctrl-C at
any moment leaves the previous version live and usable. Nothing here is pickled: FAISS indexes are
written with ``faiss.write_index`` and metadata is JSON and SQLite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from suwen.errors import IndexMissingError, InputError

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class IndexManifest(BaseModel):
    """What an index is: written with every version, read before any search."""

    name: str
    kind: Literal["text", "image"]
    encoder: str = Field(description="Model id/path that encoded the stored vectors")
    query_encoder: str | None = Field(None, description="Model id/path for queries, if different")
    dim: int
    count: int = 0
    index_type: str = "exact"
    bytes_per_vector: float | None = None
    recall_at_10: float | None = Field(None, description="Measured at build time vs exact")
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    sources: list[str] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InputError(f"index name {name!r}: use letters, digits, '-', '_' or '.' (max 64)")
    return name


def index_root(indexes_dir: Path, name: str) -> Path:
    return indexes_dir / check_name(name)


def current_version(root: Path) -> Path | None:
    """The live version directory of an index, or None when it has none yet."""
    try:
        version = (root / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    path = root / version
    return path if (path / MANIFEST).is_file() else None


def open_version(indexes_dir: Path, name: str) -> tuple[Path, IndexManifest]:
    """The live version of index ``name`` and its manifest, or a clear error."""
    root = index_root(indexes_dir, name)
    version = current_version(root)
    if version is None:
        known = ", ".join(m.name for m in list_indexes(indexes_dir)) or "none"
        raise IndexMissingError(
            f"index {name!r} not found in {indexes_dir} (indexes there: {known}); "
            "build it with `suwen index text` or `suwen index images`"
        )
    return version, read_manifest(version)


def read_manifest(version: Path) -> IndexManifest:
    return IndexManifest.model_validate_json((version / MANIFEST).read_text(encoding="utf-8"))


def list_indexes(indexes_dir: Path) -> list[IndexManifest]:
    if not indexes_dir.is_dir():
        return []
    found = []
    for root in sorted(p for p in indexes_dir.iterdir() if p.is_dir()):
        version = current_version(root)
        if version is not None:
            found.append(read_manifest(version))
    return found


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with item.open("rb") as handle:
                os.fsync(handle.fileno())
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _next_version_name(root: Path) -> str:
    numbers = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:06d}"


@contextmanager
def new_version(indexes_dir: Path, name: str, *, copy_current: bool) -> Iterator[Path]:
    """A fresh version directory to build in; published only if the block finishes.

    With ``copy_current`` the live version's files are copied in first, so an incremental add
    works on a copy and the live index stays untouched until the swap.
    """
    root = index_root(indexes_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{os.getpid()}-{_next_version_name(root)}"
    shutil.rmtree(staging, ignore_errors=True)
    live = current_version(root)
    if copy_current and live is not None:
        shutil.copytree(live, staging)
    else:
        staging.mkdir()
    try:
        yield staging
        if not (staging / MANIFEST).is_file():
            raise RuntimeError(f"index build for {name!r} wrote no manifest")
        publish_staging(root, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_staging(root: Path, staging: Path) -> Path:
    """Make a finished staging directory durable, rename it to the next version and make that
    the live one; the version's path."""
    _fsync_tree(staging)
    final = root / _next_version_name(root)
    staging.rename(final)
    publish(root, final)
    return final


def publish(root: Path, version: Path) -> None:
    """Atomically make ``version`` the live one, then drop older versions and stale staging."""
    pointer = root / f".{CURRENT}.tmp-{os.getpid()}"
    pointer.write_text(version.name + "\n", encoding="utf-8")
    with pointer.open("rb") as handle:
        os.fsync(handle.fileno())
    pointer.replace(root / CURRENT)
    for old in root.glob("v[0-9]*"):
        if old != version:
            shutil.rmtree(old, ignore_errors=True)


def write_manifest(version: Path, manifest: IndexManifest) -> None:
    (version / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")


def dump_json(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)
