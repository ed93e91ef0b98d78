"""Where an index lives on disk, how a new version replaces the old one atomically, who may
build it, and how a version is checked before anything reads it.

Layout: ``<home>/indexes/<name>/`` holds versions ``v000001/``, ``v000002/``, ... and a ``CURRENT``
file naming the live one. A build takes the index's build lock (:func:`build_lock`), writes a new
version directory completely (SQLite, vectors, BM25, the manifest), and :func:`publish_staging`
records every file's size and digest in the manifest, fsyncs the files and the directories, and
only then replaces ``CURRENT`` with ``os.replace``: a crash or Ctrl-C at any moment leaves the
previous version live and usable. Nothing here is pickled: metadata is JSON and SQLite.

Files we did not write are hostile: :func:`open_version` refuses, in one line naming the index
and the file (:class:`~suwen.errors.IndexDamagedError`), a ``CURRENT`` that does not name a
``vNNNNNN`` directory of this index, a symlink anywhere inside the index, a manifest that is not
valid, and any file whose size or digest differs from what the manifest records -- before any
parser (SQLite, FAISS, numpy, tantivy) touches it. Versions written before digests existed have
no record to check against and are refused with a request to rebuild.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from suwen.errors import IndexDamagedError, IndexMissingError, InputError
from suwen.filelock import exclusive
from suwen.files import atomic_write_text, fsync_dir, fsync_tree

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
BUILD_LOCK = ".build.lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_RE = re.compile(r"^v[0-9]{6}$")
# A manifest lists source paths; anything larger than this was not written by Suwen.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# Files up to this size are hashed whole; larger ones (multi-GB vectors) by their size, first
# and last MiB and evenly spaced sample blocks: truncation, header edits and swapped files are
# caught without reading gigabytes on every open.
FULL_DIGEST_BYTES = 16 * 1024 * 1024
EDGE_BYTES = 1024 * 1024
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 * 1024


class FileRecord(BaseModel):
    size: int = Field(ge=0)
    digest: str


class IndexManifest(BaseModel):
    """What an index is: written with every version, read before any search."""

    name: str
    kind: Literal["text", "image"]
    encoder: str = Field(description="Model id/path that encoded the stored vectors")
    query_encoder: str | None = Field(None, description="Model id/path for queries, if different")
    dim: int = Field(gt=0)
    count: int = Field(0, ge=0)
    index_type: str = "exact"
    bytes_per_vector: float | None = None
    recall_at_10: float | None = Field(None, description="Measured at build time vs exact")
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    sources: list[str] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileRecord] | None = Field(
        None, description="Every file of the version: size and digest (None: written unsealed)"
    )


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InputError(f"index name {name!r}: use letters, digits, '-', '_' or '.' (max 64)")
    return name


def index_root(indexes_dir: Path, name: str) -> Path:
    return indexes_dir / check_name(name)


# ---------------------------------------------------------------------------------------------
# Reading: the live version, checked


def current_version(root: Path) -> Path | None:
    """The live version directory of an index, or None when it has none yet. A ``CURRENT``
    that is a symlink, or names anything but a ``vNNNNNN`` directory inside ``root``, is
    refused."""
    pointer = root / CURRENT
    try:
        info = pointer.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > 64:
        raise IndexDamagedError(f"index {root.name!r}: {pointer} is not a version pointer")
    try:
        name = pointer.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexDamagedError(f"index {root.name!r}: {pointer} is unreadable ({exc})") from exc
    if not _VERSION_RE.match(name):
        raise IndexDamagedError(
            f"index {root.name!r}: {pointer} names {name[:40]!r}, not a version of this index"
        )
    path = root / name
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None  # a build that died between creating CURRENT and its version: none live
    if not stat.S_ISDIR(mode):
        raise IndexDamagedError(f"index {root.name!r}: {path} is not a directory (symlink?)")
    return path if (path / MANIFEST).is_file() else None


def open_version(indexes_dir: Path, name: str) -> tuple[Path, IndexManifest]:
    """The live version of index ``name`` and its manifest, every file checked against it."""
    root = index_root(indexes_dir, name)
    version = current_version(root)
    if version is None:
        known = ", ".join(m.name for m in list_indexes(indexes_dir)) or "none"
        raise IndexMissingError(
            f"index {name!r} not found in {indexes_dir} (indexes there: {known}); "
            "build it with `suwen index text` or `suwen index images`"
        )
    manifest = read_manifest(version)
    verify_files(version, manifest)
    return version, manifest


def live_manifest(indexes_dir: Path, name: str) -> IndexManifest | None:
    """The live version's manifest (its files checked), or None for a new index."""
    version = current_version(index_root(indexes_dir, name))
    if version is None:
        return None
    manifest = read_manifest(version)
    verify_files(version, manifest)
    return manifest


@contextlib.contextmanager
def naming_the_index(name: str) -> Iterator[None]:
    """Inside the block, an IndexDamagedError from a parser's check also names the index."""
    try:
        yield
    except IndexDamagedError as exc:
        if str(exc).startswith("index "):
            raise
        raise IndexDamagedError(f"index {name!r}: {exc}") from exc


def read_manifest(version: Path) -> IndexManifest:
    """The version's manifest, refused in one line if it is not a manifest Suwen wrote."""
    path = version / MANIFEST
    where = f"index {version.parent.name!r}: {path}"
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise IndexDamagedError(f"{where} is not a regular file (symlink?)")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise IndexDamagedError(f"{where} is {info.st_size} bytes, not a manifest")
        return IndexManifest.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise IndexDamagedError(f"{where} is unreadable ({exc.strerror or exc})") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "document"
        raise IndexDamagedError(
            f"{where} is not a valid manifest ({field}: {first['msg']})"
        ) from exc


def verify_files(version: Path, manifest: IndexManifest) -> None:
    """Every file the manifest records exists as a regular file of that size and digest, and
    nothing inside the version is a symlink."""
    where = f"index {manifest.name!r}"
    if manifest.files is None:
        raise IndexDamagedError(
            f"{where}: {version / MANIFEST} records no file digests (written by an older Suwen); "
            f"delete {version.parent} and build the index again"
        )
    for item in version.rglob("*"):
        if item.is_symlink():
            raise IndexDamagedError(f"{where}: {item} is a symlink; refusing to follow it")
    for relative, record in sorted(manifest.files.items()):
        path = version / relative
        if ".." in Path(relative).parts or Path(relative).is_absolute():
            raise IndexDamagedError(f"{where}: manifest names {relative!r} outside the version")
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise IndexDamagedError(f"{where}: {path} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise IndexDamagedError(f"{where}: {path} is not a regular file")
        if info.st_size != record.size:
            raise IndexDamagedError(
                f"{where}: {path} is {info.st_size} bytes, the manifest says {record.size} "
                "(truncated or replaced)"
            )
        if file_digest(path) != record.digest:
            raise IndexDamagedError(
                f"{where}: {path} does not match its digest in the manifest (damaged or replaced)"
            )


def file_digest(path: Path) -> str:
    """SHA-256 of the whole file up to FULL_DIGEST_BYTES; above, of its size, both ends and
    SAMPLE_BLOCKS evenly spaced blocks (``sampled:`` prefix)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= FULL_DIGEST_BYTES:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        digest.update(size.to_bytes(8, "little"))
        step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
        offsets = [(0, EDGE_BYTES), (size - EDGE_BYTES, EDGE_BYTES)]
        offsets += [(i * step, SAMPLE_BYTES) for i in range(SAMPLE_BLOCKS)]
        for offset, length in offsets:
            handle.seek(offset)
            digest.update(handle.read(length))
    return f"sampled-sha256:{digest.hexdigest()}"


def list_indexes(indexes_dir: Path) -> list[IndexManifest]:
    """The manifests of the indexes in ``indexes_dir`` (their files are checked when opened)."""
    if not indexes_dir.is_dir():
        return []
    found = []
    for root in sorted(p for p in indexes_dir.iterdir() if p.is_dir()):
        version = current_version(root)
        if version is not None:
            found.append(read_manifest(version))
    return found


# ---------------------------------------------------------------------------------------------
# Writing: one builder at a time, staging, publishing


@contextlib.contextmanager
def build_lock(indexes_dir: Path, name: str) -> Iterator[None]:
    """One writer per index, for every kind of build (text, images, the MedCPT import): a
    second build would publish over the first one's work, losing it. A second builder is
    refused in one line instead of waiting behind a build that can take hours."""
    root = index_root(indexes_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / BUILD_LOCK, f"index {name!r} is being built by another process"):
        yield


def remove_index(indexes_dir: Path, name: str) -> None:
    """Delete index ``name``, every version of it, under its build lock (a build in progress
    is refused in one line). Its version pointer goes first, so from then on no reader or
    listing finds it, also if the process is killed before the files are gone; then it is
    renamed away, freeing its name, and deleted. A searcher that has it open keeps reading
    its files (POSIX)."""
    root = index_root(indexes_dir, name)
    if not root.exists():
        return
    doomed = root.with_name(f".{root.name}.removed-{os.getpid()}")
    with build_lock(indexes_dir, name):
        (root / CURRENT).unlink(missing_ok=True)
        root.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _next_version_name(root: Path) -> str:
    numbers = [int(p.name[1:]) for p in root.glob("v[0-9]*") if p.name[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:06d}"


@contextmanager
def new_version(indexes_dir: Path, name: str, *, copy_current: bool) -> Iterator[Path]:
    """A fresh version directory to build in; published only if the block finishes. The
    caller holds :func:`build_lock`.

    With ``copy_current`` the live version's files are checked and copied in first, so an
    incremental add works on a copy and the live index stays untouched until the swap.
    """
    root = index_root(indexes_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{os.getpid()}-{_next_version_name(root)}"
    shutil.rmtree(staging, ignore_errors=True)
    live = current_version(root)
    if copy_current and live is not None:
        verify_files(live, read_manifest(live))
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


def seal(version: Path) -> None:
    """Record every file's size and digest in the version's manifest (the last write to it)."""
    manifest = read_manifest(version)
    files = {}
    for item in sorted(version.rglob("*")):
        relative = item.relative_to(version).as_posix()
        if item.is_symlink():
            raise IndexDamagedError(f"index {manifest.name!r}: {item} is a symlink")
        if item.is_file() and relative != MANIFEST and not _is_lock_file(item):
            files[relative] = FileRecord(size=item.stat().st_size, digest=file_digest(item))
    manifest.files = files
    write_manifest(version, manifest)


def _is_lock_file(path: Path) -> bool:
    """Tantivy's lock files: empty, recreated by whoever opens the index."""
    return path.name.startswith(".tantivy-") and path.name.endswith(".lock")


def publish_staging(root: Path, staging: Path) -> Path:
    """Seal a finished staging directory, make it durable, rename it to the next version and
    make that the live one; the version's path."""
    seal(staging)
    fsync_tree(staging)
    final = root / _next_version_name(root)
    staging.rename(final)
    publish(root, final)
    return final


def publish(root: Path, version: Path) -> None:
    """Atomically make ``version`` the live one, then drop older versions and stale staging.

    The version and the index directory are fsynced before ``CURRENT`` moves (so the renamed
    version is on disk before anything points at it) and after (so the new pointer is)."""
    fsync_dir(version)
    fsync_dir(root)
    atomic_write_text(root / CURRENT, version.name + "\n")  # fsyncs root again after the rename
    log.info("index %s: published %s", root.name, version.name)
    for old in root.glob("v[0-9]*"):
        if old != version:
            shutil.rmtree(old, ignore_errors=True)


def write_manifest(version: Path, manifest: IndexManifest) -> None:
    atomic_write_text(version / MANIFEST, manifest.model_dump_json(indent=2))
