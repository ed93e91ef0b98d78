"""The BM25 side of a text index on disk: a tantivy index of the chunks, in ``<version>/bm25/``.
Searching it is ``suwen.retrieval.bm25``.

Why tantivy and not SQLite FTS5 (which earlier versions used): FTS5 computes BM25 for every row
that matches any word of an OR query before it sorts, so a question's cost grows with the
postings of all its words. Tantivy keeps per-block score bounds and skips blocks that cannot
reach the top ``k`` (block-max WAND); the README gives both engines' latency at 1M chunks
(``benchmarks/index_scale.py``, ``bm25_engines``).

Documents are the chunks: ``id`` (the chunk id, an indexed fast field, so deletes and hit ids
need no stored fields) and ``body``, the article title followed by the chunk text (English
stemming, term frequencies, no positions -- no phrase queries). One field, not a title and a
text field: tantivy scores each field as its own BM25 and adds them, which lost R@1 on the
PubMedQA benchmark against one score over title and text together (what FTS5 computed, and
what one field reproduces). Nothing else is stored: texts stay in SQLite.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import tantivy

from suwen.errors import IndexDamagedError
from suwen.indexes.chunking import embedding_text

BM25_DIR = "bm25"
ANALYZER = "en_stem"  # tantivy's default tokenizer + lowercase + English Snowball stemmer
DESCRIPTION = f"tantivy BM25, one title+text field, {ANALYZER}"  # shown by `suwen index info`
WRITER_HEAP_BYTES = 256_000_000


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_unsigned_field("id", stored=False, indexed=True, fast=True)
    builder.add_text_field("body", stored=False, tokenizer_name=ANALYZER, index_option="freq")
    return builder.build()


def exists(version: Path) -> bool:
    """True when the version has a BM25 index with this module's fields."""
    try:
        meta = json.loads((version / BM25_DIR / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return {field.get("name") for field in meta.get("schema", [])} == {"id", "body"}


class Bm25Writer:
    """Adds and deletes chunks; nothing is visible or durable before :meth:`commit`."""

    def __init__(self, version: Path, *, threads: int = 1) -> None:
        """``threads`` indexing threads (0: one per core) share ``WRITER_HEAP_BYTES``."""
        directory = version / BM25_DIR
        directory.mkdir(exist_ok=True)
        self._index = tantivy.Index(_schema(), path=str(directory), reuse=True)
        self._writer = self._index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=threads)

    def add(self, chunk_id: int, title: str, text: str) -> None:
        doc = tantivy.Document()
        doc.add_unsigned("id", chunk_id)
        doc.add_text("body", embedding_text(title, text))
        self._writer.add_document(doc)

    def add_rows(self, rows: Iterable[tuple[int, str, str]]) -> int:
        count = 0
        for chunk_id, title, text in rows:
            self.add(chunk_id, title, text)
            count += 1
        return count

    def delete(self, chunk_ids: Iterable[int]) -> None:
        ids = [int(i) for i in chunk_ids]
        if ids:
            # By query: delete_documents_by_term builds an i64 term from a Python int, which
            # never matches the u64 field, and deletes nothing.
            query = tantivy.Query.term_set_query(self._index.schema, "id", ids)
            self._writer.delete_documents_by_query(query)

    def commit(self) -> None:
        """Make everything added and deleted durable, merge, and drop unused segment files."""
        self._writer.commit()
        self._writer.garbage_collect_files()

    def close(self) -> None:
        """Wait for merges and release the writer lock; uncommitted changes are dropped."""
        self._writer.rollback()
        self._writer.wait_merging_threads()


def rebuild(version: Path, rows: Iterable[tuple[int, str, str]]) -> int:
    """Replace the version's BM25 index with one built from ``(chunk id, title, text)`` rows
    (``TextRows.iter_rows``); the chunk count."""
    shutil.rmtree(version / BM25_DIR, ignore_errors=True)
    writer = Bm25Writer(version, threads=0)  # nothing else runs meanwhile: use every core
    try:
        count = writer.add_rows(rows)
        writer.commit()
    finally:
        writer.close()
    return count


def open_index(version: Path) -> tantivy.Index:
    """The version's BM25 index for searching (its files were checked against the manifest)."""
    try:
        index = tantivy.Index.open(str(version / BM25_DIR))
        index.searcher()  # opens every segment's files
        return index
    except ValueError as exc:
        raise IndexDamagedError(f"{version / BM25_DIR}: not a readable BM25 index ({exc})") from exc
