"""Build and update a PubMed text index: SQLite (documents, chunks, sources), FAISS, tantivy.

One version directory holds ``text.sqlite``, the vectors (``suwen.indexes.compressed``) and the
BM25 index ``bm25/`` (``suwen.indexes.bm25``); the vector id of a chunk is the ``chunks.id`` of
its row, as is its BM25 document's ``id``, so any hit maps straight back to its text, article
and source file. Chunk ids come from ``AUTOINCREMENT`` and are never reused, so a removed
vector can never be confused with a newer row.

Every build works on a copy of the live version (``store.new_version(copy_current=True)``) and
publishes it with an atomic rename: Ctrl-C or a crash leaves the previous version live. Long
ingests publish a checkpoint at source-file boundaries, and re-running the same command skips
articles whose content is unchanged, so an interrupted ingest resumes where it stopped.

Re-ingesting a PMID replaces its chunks and vectors; it never duplicates them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from suwen.config import Settings
from suwen.errors import IndexMismatchError, InputError, SuwenError
from suwen.indexes import article_keys, bm25, compressed, store, vectors
from suwen.indexes.chunking import chunk_document, embedding_text
from suwen.indexes.text_encoder import TextEncoder, article_encoder, query_encoder
from suwen.indexes.text_sources import (
    Deletion,
    SkippedRecord,
    SourceFormat,
    detect_format,
    expand_sources,
    read_source,
)
from suwen.types import Chunk, Document

TEXT_DB = "text.sqlite"
VECTORS_FILE = "vectors.faiss"
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

# Documents per encoding batch: large enough to keep the encoder busy, small enough that
# progress moves and memory stays flat.
DOCS_PER_FLUSH = 128


@dataclass(frozen=True)
class IngestProgress:
    """A snapshot of a running ingest, sent to the progress callback."""

    files_done: int
    files_total: int
    current: str
    documents: int
    chunks_encoded: int
    chunks_total: int


ProgressCallback = Callable[[IngestProgress], None]


class SourceReport(BaseModel):
    path: str
    format: str | None = None
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0
    error: str | None = Field(None, description="Why the file stopped being read, if it did")

    @property
    def documents(self) -> int:
        return self.added + self.updated + self.unchanged


class IngestReport(BaseModel):
    index: str
    sources: list[SourceReport] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list, description="One line per problem")
    documents: int = Field(0, description="Documents in the index afterwards")
    chunks: int = Field(0, description="Chunks (= vectors) in the index afterwards")

    def total(self, field: str) -> int:
        return sum(int(getattr(report, field)) for report in self.sources)

    @property
    def files_failed(self) -> int:
        return sum(1 for report in self.sources if report.error and not report.documents)

    @property
    def ingested_anything(self) -> bool:
        return any(report.documents or report.deleted for report in self.sources)


def content_sha256(doc: Document) -> str:
    payload = doc.model_dump(include={"title", "text", "year", "journal", "mesh", "pages"})
    payload["chunker"] = CHUNKER_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def delete_document_rows(db: sqlite3.Connection, pmid: str) -> tuple[list[int], bool]:
    """Delete a document with its chunks: the chunk ids it had (whose vectors and BM25
    documents the caller removes) and whether the document was stored at all."""
    ids = [int(r[0]) for r in db.execute("SELECT id FROM chunks WHERE pmid = ?", (pmid,))]
    if ids:
        db.execute("DELETE FROM chunks WHERE pmid = ?", (pmid,))
    cursor = db.execute("DELETE FROM documents WHERE pmid = ?", (pmid,))
    return ids, bool(cursor.rowcount)


def insert_document_rows(
    db: sqlite3.Connection,
    doc: Document,
    source_id: int,
    chunks: Sequence[tuple[str, int | None]],
    ingested: str | None = None,
) -> list[int]:
    """Store a document and its chunks ``(text, page)``; the new chunk ids in chunk order
    (ids grow with insertion). ``ingested`` defaults to now."""
    db.execute(
        "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            doc.pmid,
            doc.title,
            doc.year,
            doc.journal,
            json.dumps(doc.mesh),
            source_id,
            content_sha256(doc),
            ingested or _now(),
        ),
    )
    ids = []
    for number, (text, page) in enumerate(chunks):
        cursor = db.execute(
            "INSERT INTO chunks (pmid, chunk_no, text, page) VALUES (?, ?, ?, ?)",
            (doc.pmid, number, text, page),
        )
        ids.append(int(cursor.lastrowid or 0))
    return ids


def finish_rows(db: sqlite3.Connection, directory: Path) -> None:
    """Last step on a version's rows before its manifest: commit, and write the
    chunk-to-article keys the searcher keeps in RAM."""
    db.commit()
    article_keys.write(db, directory)


def rebuild_bm25(db: sqlite3.Connection, directory: Path) -> int:
    """Build the version's BM25 index from its rows; the number of chunks indexed."""
    return bm25.rebuild(directory, db)


def open_bm25(db: sqlite3.Connection, directory: Path) -> bm25.Bm25Writer:
    """The version's BM25 writer; a version from before ``bm25/`` existed (schema 1) gets its
    BM25 index built from its rows first."""
    if not bm25.exists(directory):
        rebuild_bm25(db, directory)
    return bm25.Bm25Writer(directory)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    return conn


class TextIndexWriter:
    """Adds, replaces and deletes documents in one (staging) version directory."""

    def __init__(
        self,
        directory: Path,
        encoder: TextEncoder,
        *,
        batch_size: int,
        index_type: str = "exact",
        compressed_threshold: int = 200_000,
    ) -> None:
        self.directory = directory
        self.encoder = encoder
        self.batch_size = batch_size
        self.index_type = index_type
        self.compressed_threshold = compressed_threshold
        self.db = connect(directory / TEXT_DB)
        self.db.executescript(SCHEMA)
        self.db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        # Exact or compressed (see suwen.indexes.compressed); a new index starts exact.
        self.index = compressed.open_or_create(directory, encoder.dim)
        compressed.check_dim(self.index, encoder.dim, f"encoder {encoder.name!r}")
        self.bm25 = open_bm25(self.db, directory)
        self._queue: dict[str, tuple[Document, int, SourceReport]] = {}
        self.chunks_encoded = 0
        self.chunks_queued = 0
        self.on_encode: Callable[[], None] | None = None

    # -- sources ---------------------------------------------------------------------------

    def source_id(self, path: Path, fmt: str) -> int:
        size = path.stat().st_size if path.is_file() else None
        self.db.execute(
            "INSERT INTO sources (path, format, size, ingested) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET format = excluded.format, size = excluded.size, "
            "ingested = excluded.ingested, error = NULL",
            (str(path), fmt, size, _now()),
        )
        row = self.db.execute("SELECT id FROM sources WHERE path = ?", (str(path),)).fetchone()
        return int(row["id"])

    def finish_source(self, source_id: int, report: SourceReport) -> None:
        self.flush()
        self.db.execute(
            "UPDATE sources SET documents = ?, skipped = ?, error = ? WHERE id = ?",
            (report.documents, report.skipped, report.error, source_id),
        )

    # -- documents -------------------------------------------------------------------------

    def add(self, doc: Document, source_id: int, report: SourceReport) -> None:
        """Queue a document; unchanged ones are counted and skipped without re-encoding."""
        row = self.db.execute(
            "SELECT content_sha256 FROM documents WHERE pmid = ?", (doc.pmid,)
        ).fetchone()
        if doc.pmid not in self._queue and row and row["content_sha256"] == content_sha256(doc):
            report.unchanged += 1
            return
        if doc.pmid in self._queue or row:
            report.updated += 1
        else:
            report.added += 1
        # A PMID seen twice before a flush: the later record wins, once.
        self._queue[doc.pmid] = (doc, source_id, report)
        if len(self._queue) >= DOCS_PER_FLUSH:
            self.flush()

    def delete(self, pmid: str) -> bool:
        """Drop a document (queued or stored); True if there was one."""
        queued = self._queue.pop(pmid, None) is not None
        return self._remove_stored(pmid) or queued

    def flush(self) -> None:
        """Chunk and encode the queued documents, then write them."""
        if not self._queue:
            return
        queue, self._queue = list(self._queue.values()), {}
        count, limit = self.encoder.count_tokens, self.encoder.max_tokens
        chunked = [
            (doc, source_id, chunk_document(doc, count, limit)) for doc, source_id, _ in queue
        ]
        texts = [embedding_text(doc.title, c.text) for doc, _, chunks in chunked for c in chunks]
        self.chunks_queued += len(texts)
        done_before = self.chunks_encoded

        def encoded(done: int, _total: int) -> None:
            self.chunks_encoded = done_before + done
            if self.on_encode:
                self.on_encode()

        matrix = self.encoder.encode(texts, batch_size=self.batch_size, progress=encoded)
        row = 0
        for doc, source_id, chunks in chunked:
            self._remove_stored(doc.pmid)
            ids = self._insert(doc, source_id, chunks)
            self.index.add(matrix[row : row + len(chunks)], ids)
            for chunk_id, chunk in zip(ids, chunks, strict=True):
                self.bm25.add(int(chunk_id), doc.title, chunk.text)
            row += len(chunks)
        self.db.commit()

    def _remove_stored(self, pmid: str) -> bool:
        ids, existed = delete_document_rows(self.db, pmid)
        if ids:
            self.index.remove(np.asarray(ids, dtype=np.int64))
            self.bm25.delete(ids)
        return existed

    def _insert(self, doc: Document, source_id: int, chunks: Sequence[Chunk]) -> vectors.IdArray:
        ids = insert_document_rows(self.db, doc, source_id, [(c.text, c.page) for c in chunks])
        return np.asarray(ids, dtype=np.int64)

    # -- finishing -------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        documents = self.db.execute("SELECT count(*) FROM documents").fetchone()[0]
        chunks = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return int(documents), int(chunks)

    def save(self, manifest: store.IndexManifest) -> None:
        """Write vectors, the article keys and the BM25 index, close SQLite and write the
        manifest (last: the store publishes only a version that has one)."""
        self.flush()
        documents, chunks = self.counts()
        if self.index.count != chunks:
            raise SuwenError(
                f"index {manifest.name!r}: {self.index.count} vectors for {chunks} chunks; "
                "refusing to publish an inconsistent index"
            )
        sources = [r["path"] for r in self.db.execute("SELECT path FROM sources ORDER BY id")]
        finish_rows(self.db, self.directory)
        self.db.close()
        self.bm25.commit()
        # Past the size threshold an exact index is compressed here (recall measured).
        self.index, described = compressed.finish_store(
            self.index, self.index_type, self.compressed_threshold
        )
        manifest.count = chunks
        manifest.sources = sources
        manifest.index_type = described["index_type"]
        manifest.bytes_per_vector = described["bytes_per_vector"]
        manifest.recall_at_10 = described["recall_at_10"]
        manifest.extra.update(documents=documents, chunks=chunks, **described["extra"])
        store.write_manifest(self.directory, manifest)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.ProgrammingError):
            self.db.close()
        self.bm25.close()


# ---------------------------------------------------------------------------------------------
# The build


def check_compatible(manifest: store.IndexManifest, settings: Settings) -> None:
    """Refuse to mix vectors of different encoders in one index."""
    if manifest.kind != "text":
        raise IndexMismatchError(f"index {manifest.name!r} is an {manifest.kind} index, not text")
    if (
        manifest.encoder != settings.text_encoder
        or (manifest.query_encoder or manifest.encoder) != settings.query_encoder
    ):
        raise IndexMismatchError(
            f"index {manifest.name!r} was built with text encoder {manifest.encoder!r} "
            f"(queries: {manifest.query_encoder or manifest.encoder!r}) but the configured one is "
            f"{settings.text_encoder!r} (queries: {settings.query_encoder!r}); set "
            f"SUWEN_TEXT_ENCODER={manifest.encoder} or build a new index with another --name"
        )


@contextlib.contextmanager
def build_lock(indexes_dir: Path, name: str) -> Iterator[None]:
    """One writer per index: a second build would publish over the first one's work."""
    root = store.index_root(indexes_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".build.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InputError(f"index {name!r} is being built by another process") from exc
        yield


class _NothingChangedError(Exception):
    """Raised inside a staging block to discard it: publishing would change nothing."""


def build_text_index(
    settings: Settings,
    name: str,
    paths: Sequence[Path],
    *,
    fmt: SourceFormat | None = None,
    progress: ProgressCallback | None = None,
    checkpoint_seconds: float = 600.0,
) -> IngestReport:
    """Create index ``name`` or add ``paths`` to it; returns what was ingested and skipped."""
    store.check_name(name)
    report = IngestReport(index=name)
    files, missing = expand_sources(paths)
    for path, message in missing:
        report.errors.append(message)
        report.sources.append(SourceReport(path=str(path), error=message))
    if not files:
        return report
    with build_lock(settings.indexes_dir, name):
        root = store.index_root(settings.indexes_dir, name)
        live = store.current_version(root)
        if live is not None:
            check_compatible(store.read_manifest(live), settings)
        encoder = article_encoder(settings)
        query_dim = query_encoder(settings).dim
        if query_dim != encoder.dim:
            raise IndexMismatchError(
                f"query encoder {settings.query_encoder!r} makes {query_dim}-d vectors, "
                f"article encoder {settings.text_encoder!r} {encoder.dim}-d"
            )
        state = _BuildState(report, files, progress)
        pending = list(files)
        while pending:
            _build_round(settings, name, encoder, pending, state, fmt, checkpoint_seconds)
    return report


@dataclass
class _BuildState:
    report: IngestReport
    files: list[Path]
    progress: ProgressCallback | None
    files_done: int = 0
    documents: int = 0
    current: str = ""


def _build_round(
    settings: Settings,
    name: str,
    encoder: TextEncoder,
    pending: list[Path],
    state: _BuildState,
    fmt: SourceFormat | None,
    checkpoint_seconds: float,
) -> None:
    """Ingest files from ``pending`` into one new version until done or a checkpoint is due."""
    started = time.monotonic()
    changed = False
    with (
        contextlib.suppress(_NothingChangedError),
        store.new_version(settings.indexes_dir, name, copy_current=True) as staging,
    ):
        writer = TextIndexWriter(
            staging,
            encoder,
            batch_size=settings.encode_batch_size,
            index_type=settings.index_type,
            compressed_threshold=settings.compressed_threshold,
        )
        try:
            writer.on_encode = lambda: _notify(state, writer)
            while pending and (time.monotonic() - started < checkpoint_seconds or not changed):
                source = _ingest_file(writer, pending.pop(0), fmt, state)
                changed |= bool(source.added or source.updated or source.deleted)
            if not changed:
                raise _NothingChangedError
            writer.save(_manifest(settings, name, encoder))
        finally:
            writer.close()
    _record_totals(settings, name, state.report)


def _record_totals(settings: Settings, name: str, report: IngestReport) -> None:
    version = store.current_version(store.index_root(settings.indexes_dir, name))
    if version is not None:
        manifest = store.read_manifest(version)
        report.documents = int(manifest.extra.get("documents", 0))
        report.chunks = manifest.count


def _manifest(settings: Settings, name: str, encoder: TextEncoder) -> store.IndexManifest:
    return store.IndexManifest(
        name=name,
        kind="text",
        encoder=settings.text_encoder,
        query_encoder=settings.query_encoder,
        dim=encoder.dim,
        index_type="exact",
        extra={
            "pooling": encoder.pooling,
            "max_tokens": encoder.max_tokens,
            "bm25": bm25.DESCRIPTION,
            "schema_version": SCHEMA_VERSION,
        },
    )


def _notify(state: _BuildState, writer: TextIndexWriter) -> None:
    if state.progress is not None:
        state.progress(
            IngestProgress(
                files_done=state.files_done,
                files_total=len(state.files),
                current=state.current,
                documents=state.documents,
                chunks_encoded=writer.chunks_encoded,
                chunks_total=writer.chunks_queued,
            )
        )


def _ingest_file(
    writer: TextIndexWriter, path: Path, fmt: SourceFormat | None, state: _BuildState
) -> SourceReport:
    """Read one source into the writer; a file-level error ends this file only."""
    source = SourceReport(path=str(path))
    state.report.sources.append(source)
    state.current = str(path)
    _notify(state, writer)
    try:
        source.format = fmt or detect_format(path)
        source_id = writer.source_id(path, source.format)
        try:
            for record in read_source(path, source.format):
                _apply(writer, record, source_id, source, state)
        except SuwenError as exc:
            source.error = str(exc)
        writer.finish_source(source_id, source)
    except SuwenError as exc:
        source.error = str(exc)
    if source.error:
        state.report.errors.append(source.error)
    state.files_done += 1
    _notify(state, writer)
    return source


def _apply(
    writer: TextIndexWriter,
    record: Document | Deletion | SkippedRecord,
    source_id: int,
    source: SourceReport,
    state: _BuildState,
) -> None:
    if isinstance(record, SkippedRecord):
        source.skipped += 1
        state.report.errors.append(record.message)
    elif isinstance(record, Deletion):
        source.deleted += int(writer.delete(record.pmid))
    elif not record.title.strip() and not record.text.strip():
        source.skipped += 1
        state.report.errors.append(f"{source.path}: PMID {record.pmid} has no title or text")
    else:
        writer.add(record, source_id, source)
        state.documents += 1
        if state.documents % 50 == 0:
            _notify(state, writer)
