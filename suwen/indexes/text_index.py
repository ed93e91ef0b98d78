"""Build and update a PubMed text index: SQLite (documents, chunks, sources), FAISS, tantivy.

One version directory holds ``text.sqlite``, the vectors (``suwen.indexes.compressed``) and the
BM25 index ``bm25/`` (``suwen.indexes.bm25``); the vector id of a chunk is the ``chunks.id`` of
its row, as is its BM25 document's ``id``, so any hit maps straight back to its text, article
and source file. Chunk ids come from ``AUTOINCREMENT`` and are never reused, so a removed
vector can never be confused with a newer row.

The SQL lives in ``suwen.indexes.text_store``; every build holds the index's build lock and works
on a copy of the live version (``store.new_version(copy_current=True)``) and
publishes it with an atomic rename: Ctrl-C or a crash leaves the previous version live. Long
ingests publish a checkpoint at source-file boundaries, and re-running the same command skips
articles whose content is unchanged, so an interrupted ingest resumes where it stopped.

Re-ingesting a PMID replaces its chunks and vectors; it never duplicates them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from suwen.config import Settings
from suwen.errors import IndexDamagedError, IndexMismatchError, SuwenError
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
from suwen.indexes.text_store import SCHEMA_VERSION, TextRows, content_sha256
from suwen.types import Chunk, Document

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


def finish_rows(rows: TextRows, directory: Path) -> None:
    """Last step on a version's rows before its manifest: commit, and write the
    chunk-to-article keys the searcher keeps in RAM."""
    rows.commit()
    article_keys.write(rows, directory)


def open_bm25(rows: TextRows, directory: Path) -> bm25.Bm25Writer:
    """The version's BM25 writer; a new version gets its (empty) BM25 index first."""
    if not bm25.exists(directory):
        bm25.rebuild(directory, rows.iter_rows())
    return bm25.Bm25Writer(directory)


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
        code_bytes: int = compressed.CODE_BYTES,
    ) -> None:
        self.directory = directory
        self.encoder = encoder
        self.batch_size = batch_size
        self.index_type = index_type
        self.compressed_threshold = compressed_threshold
        self.code_bytes = code_bytes
        self.rows = TextRows.create(directory)
        # Exact or compressed (see suwen.indexes.compressed); a new index starts exact.
        self.index = compressed.open_or_create(directory, encoder.dim)
        compressed.check_dim(self.index, encoder.dim, f"encoder {encoder.name!r}")
        self.bm25 = open_bm25(self.rows, directory)
        self._queue: dict[str, tuple[Document, int, SourceReport]] = {}
        self.chunks_encoded = 0
        self.chunks_queued = 0
        self.on_encode: Callable[[], None] | None = None

    # -- sources ---------------------------------------------------------------------------

    def source_id(self, path: Path, fmt: str) -> int:
        size = path.stat().st_size if path.is_file() else None
        return self.rows.upsert_source(str(path), fmt, size)

    def finish_source(self, source_id: int, report: SourceReport) -> None:
        self.flush()
        self.rows.finish_source(source_id, report.documents, report.skipped, report.error)

    # -- documents -------------------------------------------------------------------------

    def add(self, doc: Document, source_id: int, report: SourceReport) -> None:
        """Queue a document; unchanged ones are counted and skipped without re-encoding."""
        stored = self.rows.content_hash(doc.pmid)
        if doc.pmid not in self._queue and stored == content_sha256(doc):
            report.unchanged += 1
            return
        if doc.pmid in self._queue or stored is not None:
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
        self.rows.commit()

    def _remove_stored(self, pmid: str) -> bool:
        ids, existed = self.rows.delete_document(pmid)
        if ids:
            self.index.remove(np.asarray(ids, dtype=np.int64))
            self.bm25.delete(ids)
        return existed

    def _insert(self, doc: Document, source_id: int, chunks: Sequence[Chunk]) -> vectors.IdArray:
        ids = self.rows.insert_document(doc, source_id, [(c.text, c.page) for c in chunks])
        return np.asarray(ids, dtype=np.int64)

    # -- finishing -------------------------------------------------------------------------

    def save(self, manifest: store.IndexManifest) -> None:
        """Write vectors, the article keys and the BM25 index, close SQLite and write the
        manifest (last: the store publishes only a version that has one)."""
        self.flush()
        documents, chunks = self.rows.counts()
        if self.index.count != chunks:
            raise IndexDamagedError(
                f"index {manifest.name!r}: {self.index.count} vectors for {chunks} chunks; "
                "refusing to publish an inconsistent index"
            )
        sources = self.rows.source_paths()
        finish_rows(self.rows, self.directory)
        self.rows.close()
        self.bm25.commit()
        # Past the size threshold an exact index is compressed here (recall measured).
        self.index, described = compressed.finish_store(
            self.index, self.index_type, self.compressed_threshold, code_bytes=self.code_bytes
        )
        manifest.count = chunks
        manifest.sources = sources
        manifest.index_type = described["index_type"]
        manifest.bytes_per_vector = described["bytes_per_vector"]
        manifest.recall_at_10 = described["recall_at_10"]
        manifest.extra.update(documents=documents, chunks=chunks, **described["extra"])
        store.write_manifest(self.directory, manifest)

    def close(self) -> None:
        self.rows.close()
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
    with store.build_lock(settings.indexes_dir, name):
        live = store.live_manifest(settings.indexes_dir, name)
        if live is not None:
            check_compatible(live, settings)
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
            code_bytes=settings.compressed_code_bytes,
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
    if version is not None:  # just published by this build: read, not re-checked
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
