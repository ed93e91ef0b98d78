"""The BM25 side of a text index: a tantivy index of the chunks, in ``<version>/bm25/``.

Why tantivy and not SQLite FTS5 (which earlier versions used): FTS5 computes BM25 for every row
that matches any word of an OR query before it sorts, so a question's cost grows with the
postings of all its words -- 611 ms p50 for the top 200 at 1M chunks. Tantivy keeps per-block
score bounds and skips blocks that cannot reach the top ``k`` (block-max WAND): 6.4 ms p50 on
the same chunks and questions (``benchmarks/index_scale.py``, ``bm25_engines``).

Documents are the chunks: ``id`` (the chunk id, an indexed fast field, so deletes and hit ids
need no stored fields) and ``body``, the article title followed by the chunk text (English
stemming, term frequencies, no positions -- no phrase queries). One field, not a title and a
text field: tantivy scores each field as its own BM25 and adds them, which gave R@1 0.870 on
the PubMedQA benchmark against 0.949 for one score over title and text together (what FTS5
computed, and what one field reproduces). Nothing else is stored: texts stay in SQLite.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import tantivy

from suwen.indexes.chunking import embedding_text

BM25_DIR = "bm25"
ANALYZER = "en_stem"  # tantivy's default tokenizer + lowercase + English Snowball stemmer
DESCRIPTION = f"tantivy BM25, one title+text field, {ANALYZER}"  # shown by `suwen index info`
WRITER_HEAP_BYTES = 256_000_000
# Tantivy's default tokenizer splits on anything not alphanumeric; query words split the same
# way are single terms, so a quoted word is always a term query, never a phrase.
_QUERY_WORD = re.compile(r"[^\W_]+", re.UNICODE)


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


def chunk_rows(db: sqlite3.Connection) -> Iterable[tuple[int, str, str]]:
    """Every chunk as ``(id, title, text)`` in id order, for (re)building the BM25 index."""
    sql = "SELECT c.id, d.title, c.text FROM chunks AS c JOIN documents AS d ON d.pmid = c.pmid"
    for chunk_id, title, text in db.execute(sql + " ORDER BY c.id"):
        yield int(chunk_id), str(title or ""), str(text or "")


def rebuild(version: Path, db: sqlite3.Connection) -> int:
    """Replace the version's BM25 index with one built from its SQLite rows; the chunk count."""
    shutil.rmtree(version / BM25_DIR, ignore_errors=True)
    writer = Bm25Writer(version, threads=0)  # nothing else runs meanwhile: use every core
    try:
        count = writer.add_rows(chunk_rows(db))
        writer.commit()
    finally:
        writer.close()
    return count


def query_words(text: str, stopwords: frozenset[str]) -> list[str]:
    """The distinct content words of free text (stop words dropped unless nothing is left)."""
    words = [w.lower() for w in _QUERY_WORD.findall(text)]
    return list(dict.fromkeys([w for w in words if w not in stopwords] or words))


class Bm25Searcher:
    """Top chunks by BM25 over title and text; safe to share between threads."""

    def __init__(self, version: Path) -> None:
        self._index = tantivy.Index.open(str(version / BM25_DIR))
        self._searcher = self._index.searcher()
        self._lock = threading.Lock()

    def search(self, words: Sequence[str], depth: int) -> list[tuple[int, float]]:
        """``(chunk id, score)`` best first for chunks holding any of ``words``."""
        if not words or depth < 1:
            return []
        # Quoted words are plain terms: user text is never read as query syntax.
        query = self._index.parse_query(" ".join(f'"{word}"' for word in words), ["body"])
        with self._lock:
            # count=False: counting every match would disable the block skipping.
            found = self._searcher.search(query, depth, count=False).hits
            ids = self._searcher.fast_field_values("id", [address for _, address in found])
        return [
            (int(chunk_id), float(score))
            for (score, _), chunk_id in zip(found, ids, strict=True)
            if chunk_id is not None
        ]
