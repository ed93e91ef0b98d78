"""The on-disk layout of one text index version, and every SQL statement that touches it.

A version directory holds:

* ``text.sqlite`` (:data:`TEXT_DB`): ``sources``, ``documents``, ``chunks`` (and, for MedCPT
  imports, ``medcpt_progress``); a chunk's ``id`` is its vector id and its BM25 document id;
* the vectors (``suwen.indexes.compressed``: exact or compressed, as the index was built);
* ``bm25/``, the tantivy index of the chunks (``suwen.indexes.bm25``);
* ``article_keys.npy`` (``suwen.indexes.article_keys``);
* ``manifest.json`` (``suwen.indexes.store``).

:class:`TextRows` is the SQLite part: builders (``text_index``, ``medcpt_import``) and the
searcher (``retrieval.text``) read and write rows only through its typed methods.
:class:`TextStore` opens a whole checked version for searching. Chunk ids come from
``AUTOINCREMENT`` and are never reused, so a removed vector can never be confused with a newer
row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import tantivy

from suwen.errors import IndexDamagedError, IndexMismatchError
from suwen.indexes import article_keys, bm25, compressed, store
from suwen.indexes.compressed import VectorStore
from suwen.types import Document

TEXT_DB = "text.sqlite"
SCHEMA_VERSION = 2  # 2: BM25 moved from an FTS5 table to bm25/ (tantivy)
# Part of every document's content hash: a change to chunking re-encodes on the next ingest.
CHUNKER_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    format TEXT NOT NULL,
    size INTEGER,
    ingested TEXT NOT NULL,
    documents INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE TABLE IF NOT EXISTS documents (
    pmid TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    year INTEGER,
    journal TEXT,
    mesh TEXT NOT NULL,
    source_id INTEGER REFERENCES sources(id),
    content_sha256 TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pmid TEXT NOT NULL REFERENCES documents(pmid),
    chunk_no INTEGER NOT NULL,
    text TEXT NOT NULL,
    page INTEGER,
    UNIQUE (pmid, chunk_no)
);
"""

MEDCPT_PROGRESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS medcpt_progress (
    chunk INTEGER PRIMARY KEY,
    embeds TEXT NOT NULL,
    signature TEXT NOT NULL,
    rows INTEGER NOT NULL,
    articles INTEGER NOT NULL,
    replaced INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    last_chunk_id INTEGER NOT NULL,
    finished TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ChunkRow:
    """A chunk with its article's fields, as search shows it."""

    id: int
    pmid: str
    chunk_no: int
    text: str
    page: int | None
    title: str
    year: int | None
    journal: str | None
    source: str


@dataclass(frozen=True)
class MedcptChunkRecord:
    """One imported NCBI chunk file, as ``medcpt_progress`` records it."""

    chunk: int
    embeds: str
    signature: str
    rows: int
    articles: int
    replaced: int
    skipped: int
    last_chunk_id: int


def content_sha256(doc: Document) -> str:
    payload = doc.model_dump(include={"title", "text", "year", "journal", "mesh", "pages"})
    payload["chunker"] = CHUNKER_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class TextRows:
    """The SQLite file of a text index version: every statement on it lives here."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    @classmethod
    def create(cls, directory: Path, *, medcpt_progress: bool = False) -> TextRows:
        """Open (creating if needed) the version's rows for writing, schema up to date."""
        path = directory / TEXT_DB
        db = sqlite3.connect(path)
        db.row_factory = sqlite3.Row
        db.executescript(SCHEMA + (MEDCPT_PROGRESS_SCHEMA if medcpt_progress else ""))
        db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        db.commit()
        return cls(db, path)

    @classmethod
    def open_read_only(cls, directory: Path) -> TextRows:
        """The rows of a published version, read-only and shareable between threads."""
        path = directory / TEXT_DB
        uri = f"{path.resolve().as_uri()}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            db.row_factory = sqlite3.Row
            rows = cls(db, path)
            rows.schema_version()
        except sqlite3.DatabaseError as exc:
            raise IndexDamagedError(f"{path}: not a Suwen text index database ({exc})") from exc
        return rows

    def schema_version(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row is not None else 0

    def commit(self) -> None:
        self.db.commit()

    def rollback(self) -> None:
        self.db.rollback()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.ProgrammingError):
            self.db.close()

    # -- sources -------------------------------------------------------------------------------

    def upsert_source(self, path: str, fmt: str, size: int | None) -> int:
        """The id of source file ``path``, its format, size and ingest time refreshed."""
        self.db.execute(
            "INSERT INTO sources (path, format, size, ingested) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET format = excluded.format, size = excluded.size, "
            "ingested = excluded.ingested, error = NULL",
            (path, fmt, size, now()),
        )
        row = self.db.execute("SELECT id FROM sources WHERE path = ?", (path,)).fetchone()
        return int(row[0])

    def finish_source(
        self, source_id: int, documents: int, skipped: int, error: str | None
    ) -> None:
        self.db.execute(
            "UPDATE sources SET documents = ?, skipped = ?, error = ? WHERE id = ?",
            (documents, skipped, error, source_id),
        )

    def source_paths(self) -> list[str]:
        return [str(r[0]) for r in self.db.execute("SELECT path FROM sources ORDER BY id")]

    # -- documents and chunks ------------------------------------------------------------------

    def content_hash(self, pmid: str) -> str | None:
        row = self.db.execute(
            "SELECT content_sha256 FROM documents WHERE pmid = ?", (pmid,)
        ).fetchone()
        return None if row is None else str(row[0])

    def delete_document(self, pmid: str) -> tuple[list[int], bool]:
        """Delete a document with its chunks: the chunk ids it had (whose vectors and BM25
        documents the caller removes) and whether the document was stored at all."""
        ids = [int(r[0]) for r in self.db.execute("SELECT id FROM chunks WHERE pmid = ?", (pmid,))]
        if ids:
            self.db.execute("DELETE FROM chunks WHERE pmid = ?", (pmid,))
        cursor = self.db.execute("DELETE FROM documents WHERE pmid = ?", (pmid,))
        return ids, bool(cursor.rowcount)

    def insert_document(
        self,
        doc: Document,
        source_id: int,
        chunks: Sequence[tuple[str, int | None]],
        ingested: str | None = None,
    ) -> list[int]:
        """Store a document and its chunks ``(text, page)``; the new chunk ids in chunk order
        (ids grow with insertion). ``ingested`` defaults to now."""
        self.db.execute(
            "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                doc.pmid,
                doc.title,
                doc.year,
                doc.journal,
                json.dumps(doc.mesh),
                source_id,
                content_sha256(doc),
                ingested or now(),
            ),
        )
        ids = []
        for number, (text, page) in enumerate(chunks):
            cursor = self.db.execute(
                "INSERT INTO chunks (pmid, chunk_no, text, page) VALUES (?, ?, ?, ?)",
                (doc.pmid, number, text, page),
            )
            ids.append(int(cursor.lastrowid or 0))
        return ids

    def counts(self) -> tuple[int, int]:
        """(documents, chunks)."""
        documents = self.db.execute("SELECT count(*) FROM documents").fetchone()[0]
        chunks = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return int(documents), int(chunks)

    def rows(self, chunk_ids: Sequence[int]) -> dict[int, ChunkRow]:
        """The chunks with these ids (missing ids are left out), with their articles."""
        if not chunk_ids:
            return {}
        sql = (
            "SELECT c.id, c.pmid, c.chunk_no, c.text, c.page, d.title, d.year, d.journal, "
            "s.path AS source FROM chunks AS c JOIN documents AS d ON d.pmid = c.pmid "
            "LEFT JOIN sources AS s ON s.id = d.source_id "
            "WHERE c.id IN (SELECT value FROM json_each(?))"
        )
        found = self.db.execute(sql, (json.dumps([int(i) for i in chunk_ids]),)).fetchall()
        return {
            int(r["id"]): ChunkRow(
                id=int(r["id"]),
                pmid=str(r["pmid"]),
                chunk_no=int(r["chunk_no"]),
                text=str(r["text"]),
                page=r["page"],
                title=str(r["title"] or ""),
                year=r["year"],
                journal=r["journal"],
                source=str(r["source"] or ""),
            )
            for r in found
        }

    def chunk_ids_of(self, pmids: Collection[str]) -> set[int]:
        if not pmids:
            return set()
        sql = "SELECT id FROM chunks WHERE pmid IN (SELECT value FROM json_each(?))"
        return {int(row[0]) for row in self.db.execute(sql, (json.dumps(list(pmids)),))}

    def iter_rows(self) -> Iterator[tuple[int, str, str]]:
        """Every chunk as ``(id, title, text)`` in id order, for (re)building the BM25 index."""
        sql = (
            "SELECT c.id, d.title, c.text FROM chunks AS c JOIN documents AS d "
            "ON d.pmid = c.pmid ORDER BY c.id"
        )
        for chunk_id, title, text in self.db.execute(sql):
            yield int(chunk_id), str(title or ""), str(text or "")

    def chunk_articles(self) -> list[tuple[int, str]]:
        """``(chunk id, pmid)`` of every chunk, grouped by article (the (pmid, chunk_no)
        index only, not the texts)."""
        sql = "SELECT id, pmid FROM chunks ORDER BY pmid, chunk_no"
        return [(int(r[0]), str(r[1])) for r in self.db.execute(sql)]

    def last_committed_id(self) -> int:
        """The largest chunk id ever committed: vectors above it belong to no row."""
        row = self.db.execute("SELECT max(id) FROM chunks").fetchone()
        sequence = self.db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'chunks'"
        ).fetchone()
        values = [int(v[0]) for v in (row, sequence) if v is not None and v[0] is not None]
        return max(values, default=0)

    def numeric_pmid_chunk_ids(self, stride: int) -> list[int]:
        """Chunk ids of articles whose PMID is a number divisible by ``stride``."""
        sql = (
            "SELECT id FROM chunks WHERE pmid NOT GLOB '*[^0-9]*' AND pmid != '' "
            "AND CAST(pmid AS INTEGER) % ? = 0"
        )
        return [int(r[0]) for r in self.db.execute(sql, (stride,))]

    # -- MedCPT import progress ----------------------------------------------------------------

    def medcpt_signatures(self) -> dict[int, str]:
        """``{chunk number: signature}`` of imported NCBI chunks; empty for other indexes."""
        try:
            found = self.db.execute("SELECT chunk, signature FROM medcpt_progress").fetchall()
        except sqlite3.OperationalError:  # an index built by `suwen index text` only
            return {}
        return {int(r[0]): str(r[1]) for r in found}

    def record_medcpt_chunk(self, record: MedcptChunkRecord) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO medcpt_progress VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.chunk,
                record.embeds,
                record.signature,
                record.rows,
                record.articles,
                record.replaced,
                record.skipped,
                record.last_chunk_id,
                now(),
            ),
        )


@dataclass
class TextStore:
    """A published text index version, checked and opened for searching: its rows, vectors,
    BM25 index and article keys."""

    directory: Path
    manifest: store.IndexManifest
    rows: TextRows
    vectors: VectorStore
    bm25: tantivy.Index
    keys: article_keys.KeyArray

    @classmethod
    def open(cls, indexes_dir: Path, name: str) -> TextStore:
        version, manifest = store.open_version(indexes_dir, name)
        if manifest.kind != "text":
            raise IndexMismatchError(f"index {name!r} is an {manifest.kind} index, not text")
        with store.naming_the_index(name):
            rows = TextRows.open_read_only(version)
            try:
                return cls._open_parts(version, manifest, rows)
            except BaseException:
                rows.close()
                raise

    @classmethod
    def _open_parts(cls, version: Path, manifest: store.IndexManifest, rows: TextRows) -> TextStore:
        where = f"index {manifest.name!r}"
        if rows.schema_version() != SCHEMA_VERSION or not bm25.exists(version):
            raise IndexDamagedError(
                f"{version}: the BM25 index is missing or was written by another Suwen "
                f"(schema {rows.schema_version()}); delete {version.parent} and build it again "
                "with `suwen index text`"
            )
        vectors = compressed.open_store(version)
        if vectors.dim != manifest.dim:
            raise IndexDamagedError(
                f"{where}: {version} holds {vectors.dim}-d vectors, its manifest {manifest.dim}"
            )
        keys = article_keys.load(version, manifest.count)
        return cls(version, manifest, rows, vectors, bm25.open_index(version), keys)

    def close(self) -> None:
        self.rows.close()
