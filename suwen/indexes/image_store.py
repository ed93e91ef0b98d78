"""The on-disk layout of one image index version, and every SQL statement that touches it.

A version directory holds ``images.sqlite`` (:data:`IMAGES_DB`: one row per stored frame, whose
``id`` is its vector id), the vectors (an exact ``suwen.indexes.compressed.ExactStore``) and
``manifest.json``. The builder (``image_index``) and the searcher (``retrieval.images``) go
through :class:`ImageStore` only.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from suwen.errors import IndexDamagedError, IndexMismatchError
from suwen.indexes import compressed, store
from suwen.indexes.compressed import VectorStore
from suwen.indexes.vectors import FloatArray, IdArray

IMAGES_DB = "images.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the vector id of this row
    case_id TEXT NOT NULL,
    frame TEXT NOT NULL DEFAULT '',        -- '' for a plain image, else e.g. 'axial 13/25'
    path TEXT NOT NULL,
    caption TEXT NOT NULL DEFAULT '',
    modality TEXT,
    body_part TEXT,
    source TEXT,
    sha256 TEXT NOT NULL,
    UNIQUE (case_id, frame)
);
CREATE INDEX IF NOT EXISTS images_case ON images (case_id);
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
"""
_COLUMNS = "case_id, frame, path, caption, modality, body_part, source, sha256"


@dataclass(frozen=True)
class CaseFields:
    """What is stored about a case, the same for each of its frames."""

    case_id: str
    path: str
    caption: str
    modality: str | None
    body_part: str | None
    source: str | None


@dataclass(frozen=True)
class ImageRow:
    """One stored frame of a case."""

    case_id: str
    frame: str
    path: str
    caption: str
    modality: str | None
    body_part: str | None
    source: str | None
    sha256: str


class ImageStore:
    """One image index version: its rows and vectors."""

    def __init__(self, directory: Path, db: sqlite3.Connection, vectors: VectorStore) -> None:
        self.directory = directory
        self.db = db
        self.vectors = vectors

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open_for_build(cls, directory: Path, dim: int) -> ImageStore:
        """The staging version's store (copied from the live one, or new), writable."""
        db = sqlite3.connect(directory / IMAGES_DB)
        db.executescript(SCHEMA)
        vectors = compressed.open_or_create(directory, dim)
        compressed.check_dim(vectors, dim, "the image encoder")
        return cls(directory, db, vectors)

    @classmethod
    def open(cls, indexes_dir: Path, name: str) -> tuple[ImageStore, store.IndexManifest]:
        """The live version of image index ``name``, checked, read-only."""
        version, manifest = store.open_version(indexes_dir, name)
        if manifest.kind != "image":
            raise IndexMismatchError(f"index {name!r} is a {manifest.kind} index, not images")
        with store.naming_the_index(name):
            return cls._open_parts(version, manifest, name), manifest

    @classmethod
    def _open_parts(cls, version: Path, manifest: store.IndexManifest, name: str) -> ImageStore:
        path = version / IMAGES_DB
        try:
            db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            db.execute("SELECT count(*) FROM images").fetchone()
        except sqlite3.DatabaseError as exc:
            raise IndexDamagedError(f"{path}: not a Suwen image index database ({exc})") from exc
        try:
            vectors = compressed.open_store(version)
        except BaseException:
            db.close()
            raise
        if vectors.dim != manifest.dim:
            db.close()
            raise IndexDamagedError(
                f"index {name!r}: {version} holds {vectors.dim}-d vectors, manifest {manifest.dim}"
            )
        return cls(version, db, vectors)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.ProgrammingError):
            self.db.close()

    # -- reading -------------------------------------------------------------------------------

    def rows(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        if not ids:
            return {}
        found = self.db.execute(
            f"SELECT id, {_COLUMNS} FROM images WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps([int(i) for i in ids]),),
        ).fetchall()
        return {int(row[0]): ImageRow(*row[1:]) for row in found}

    def case_hashes(self, case_id: str) -> list[str]:
        """The file hash of each stored frame of ``case_id`` (none: a new case)."""
        query = "SELECT sha256 FROM images WHERE case_id = ?"
        return [str(row[0]) for row in self.db.execute(query, (case_id,))]

    def case_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(DISTINCT case_id) FROM images").fetchone()[0])

    # -- writing -------------------------------------------------------------------------------

    def update_case_fields(self, fields: CaseFields) -> None:
        self.db.execute(
            "UPDATE images SET path = ?, caption = ?, modality = ?, body_part = ?, source = ? "
            "WHERE case_id = ?",
            (
                fields.path,
                fields.caption,
                fields.modality,
                fields.body_part,
                fields.source,
                fields.case_id,
            ),
        )

    def replace_case(
        self, fields: CaseFields, sha256: str, frames: Sequence[str], embeddings: FloatArray
    ) -> bool:
        """Store a case's frames (labels) with their vectors, replacing what the case had;
        True if the case was stored before."""
        old_ids = [
            int(row[0])
            for row in self.db.execute("SELECT id FROM images WHERE case_id = ?", (fields.case_id,))
        ]
        if old_ids:
            self.vectors.remove(np.asarray(old_ids, dtype=np.int64))
            self.db.execute("DELETE FROM images WHERE case_id = ?", (fields.case_id,))
        new_ids = []
        for label in frames:
            cursor = self.db.execute(
                f"INSERT INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    fields.case_id,
                    label,
                    fields.path,
                    fields.caption,
                    fields.modality,
                    fields.body_part,
                    fields.source,
                    sha256,
                ),
            )
            new_ids.append(int(cursor.lastrowid or 0))
        ids: IdArray = np.asarray(new_ids, dtype=np.int64)
        self.vectors.add(embeddings, ids)
        return bool(old_ids)

    def save(self) -> None:
        """Commit the rows and write the vectors (before the manifest)."""
        self.db.commit()
        self.vectors.save()
