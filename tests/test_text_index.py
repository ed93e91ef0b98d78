"""Building and updating a text index: SQLite + tantivy + FAISS stay consistent, re-ingest updates
in place, additions are incremental, and an interrupted build leaves the old version live."""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import faiss
import pytest

from benchmarks.fts5_baseline import create_fts5_table
from suwen.errors import IndexDamagedError, IndexMismatchError
from suwen.indexes import bm25, store
from suwen.indexes.compressed import EXACT_FILE
from suwen.indexes.text_index import TextIndexWriter, build_text_index
from suwen.indexes.text_store import TEXT_DB
from suwen.retrieval.text import TextSearcher
from tests.fixtures_text import (
    PUBMEDQA_DOCS,
    PUBTATOR_DOCS,
    TEXT_INDEX,
    bm25_chunk_ids,
    text_settings_for,
    write_pdf,
)

ALL_DOCS = PUBMEDQA_DOCS + PUBTATOR_DOCS + 1


def _live(home: Path) -> Path:
    version = store.current_version(home / "indexes" / TEXT_INDEX)
    assert version is not None
    return version


def _table_counts(version: Path) -> dict[str, int]:
    db = sqlite3.connect(version / TEXT_DB)
    try:
        return {
            table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("documents", "chunks", "sources")
        }
    finally:
        db.close()


def _assert_consistent(version: Path) -> dict[str, int]:
    """Every chunk has exactly one BM25 document and one vector, under the same id."""
    counts = _table_counts(version)
    index: Any = faiss.read_index(str(version / EXACT_FILE))
    assert counts["chunks"] == index.ntotal
    db = sqlite3.connect(version / TEXT_DB)
    try:
        chunk_ids = sorted(r[0] for r in db.execute("SELECT id FROM chunks"))
    finally:
        db.close()
    assert bm25_chunk_ids(version) == chunk_ids
    stored = sorted(int(index.id_map.at(i)) for i in range(index.ntotal))
    assert stored == chunk_ids
    return counts


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_session_index_is_consistent_and_described(text_index_home: Path) -> None:
    version = _live(text_index_home)
    counts = _assert_consistent(version)
    assert counts["documents"] == ALL_DOCS
    assert counts["chunks"] > ALL_DOCS  # some abstracts exceed MiniLM's 256 tokens
    assert counts["sources"] == 3
    manifest = store.read_manifest(version)
    assert manifest.kind == "text"
    assert manifest.dim == 384
    assert manifest.count == counts["chunks"]
    assert manifest.encoder == manifest.query_encoder
    assert manifest.extra["documents"] == ALL_DOCS
    assert len(manifest.sources) == 3


def test_reingest_same_pmid_updates_instead_of_duplicating(
    text_home_copy: Path,
    minilm_path: Path,
    pubmedqa_subset: dict[str, dict[str, object]],
    tmp_path: Path,
) -> None:
    settings = text_settings_for(text_home_copy, minilm_path)
    pmid = sorted(pubmedqa_subset)[0]
    before = _table_counts(_live(text_home_copy))
    new_text = "Zebrafish xylophone quokka: a deliberately unique replacement abstract."
    source = _jsonl(
        tmp_path / "fix.jsonl", [{"pmid": pmid, "title": "Fixed", "abstract": new_text}]
    )

    report = build_text_index(settings, TEXT_INDEX, [source])

    assert report.sources[0].updated == 1 and report.sources[0].added == 0
    after = _assert_consistent(_live(text_home_copy))
    assert after["documents"] == before["documents"]
    with TextSearcher.open(settings, TEXT_INDEX) as searcher:
        for method in ("bm25", "dense", "hybrid"):
            hits = searcher.search("zebrafish xylophone quokka", 3, method=method)  # type: ignore[arg-type]
            assert hits[0].pmid == pmid, method
            assert hits[0].title == "Fixed" and hits[0].text == new_text
            assert hits[0].source == str(source)
        question = str(pubmedqa_subset[pmid]["QUESTION"])
        assert pmid not in [h.pmid for h in searcher.search(question, 10, method="bm25")]
    db = sqlite3.connect(_live(text_home_copy) / TEXT_DB)
    try:
        rows = db.execute("SELECT chunk_no, text FROM chunks WHERE pmid = ?", (pmid,)).fetchall()
    finally:
        db.close()
    assert rows == [(0, new_text)]  # the old chunks are gone, not kept beside the new one


def test_same_source_again_changes_nothing(
    text_home_copy: Path, minilm_path: Path, text_corpus: Path
) -> None:
    settings = text_settings_for(text_home_copy, minilm_path)
    version = _live(text_home_copy)
    report = build_text_index(settings, TEXT_INDEX, [text_corpus / "ncbi_subset.txt"])
    assert report.sources[0].unchanged == PUBTATOR_DOCS
    assert report.total("added") == report.total("updated") == 0
    assert report.ingested_anything
    assert _live(text_home_copy) == version  # nothing new to publish


def test_incremental_add_keeps_existing_documents(
    text_home_copy: Path, minilm_path: Path, shared_data: Path, tmp_path: Path
) -> None:
    settings = text_settings_for(text_home_copy, minilm_path)
    bc5 = (shared_data / "abstracts" / "bc5cdr" / "CDR_TestSet.PubTator.txt").read_text(
        encoding="utf-8"
    )
    extra = tmp_path / "cdr_three.txt"
    extra.write_text("\n\n".join(bc5.split("\n\n")[:3]) + "\n", encoding="utf-8")

    report = build_text_index(settings, TEXT_INDEX, [extra])

    assert report.sources[0].added == 3
    counts = _assert_consistent(_live(text_home_copy))
    assert counts["documents"] == ALL_DOCS + 3
    assert counts["sources"] == 4
    with TextSearcher.open(settings, TEXT_INDEX) as searcher:
        assert searcher.search("famotidine delirium", 1)[0].pmid == "8701013"  # new
        assert searcher.search("budesonide formoterol mild asthma", 1)[0].pmid == "29768149"  # old


def test_delete_citation_removes_the_article(
    text_home_copy: Path, minilm_path: Path, tmp_path: Path
) -> None:
    settings = text_settings_for(text_home_copy, minilm_path)
    update = tmp_path / "pubmed24n1219.xml.gz"
    update.write_bytes(
        gzip.compress(
            b"<PubmedArticleSet><DeleteCitation><PMID Version='1'>29768149</PMID>"
            b"</DeleteCitation></PubmedArticleSet>"
        )
    )
    report = build_text_index(settings, TEXT_INDEX, [update])
    assert report.sources[0].deleted == 1
    counts = _assert_consistent(_live(text_home_copy))
    assert counts["documents"] == ALL_DOCS - 1
    with TextSearcher.open(settings, TEXT_INDEX) as searcher:
        assert all(h.pmid != "29768149" for h in searcher.search("budesonide formoterol", 10))


def test_interrupted_build_leaves_previous_version_searchable(
    text_home_copy: Path,
    minilm_path: Path,
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = text_settings_for(text_home_copy, minilm_path)
    version = _live(text_home_copy)
    blocks = (shared_data / "abstracts" / "bc5cdr" / "CDR_TestSet.PubTator.txt").read_text(
        encoding="utf-8"
    )
    blocks_list = blocks.split("\n\n")
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("\n\n".join(blocks_list[:2]) + "\n", encoding="utf-8")
    second.write_text("\n\n".join(blocks_list[2:4]) + "\n", encoding="utf-8")
    flushes = 0
    real_flush = TextIndexWriter.flush

    def flush_then_interrupt(self: TextIndexWriter) -> None:
        nonlocal flushes
        if self._queue:
            flushes += 1
        if flushes == 2:  # the first file is already written into the staging copy
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(TextIndexWriter, "flush", flush_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_text_index(settings, TEXT_INDEX, [first, second])
    monkeypatch.undo()
    assert flushes == 2

    assert _live(text_home_copy) == version
    assert _assert_consistent(version)["documents"] == ALL_DOCS
    root = text_home_copy / "indexes" / TEXT_INDEX
    assert not list(root.glob(".staging-*"))  # no half-built copy left behind
    with TextSearcher.open(settings, TEXT_INDEX) as searcher:
        assert searcher.search("budesonide formoterol mild asthma", 1)[0].pmid == "29768149"
        assert all(h.pmid != "8701013" for h in searcher.search("famotidine delirium", 5))

    # The same command run again completes, and publishes everything.
    report = build_text_index(settings, TEXT_INDEX, [first, second])
    assert report.total("added") == 4
    assert _assert_consistent(_live(text_home_copy))["documents"] == ALL_DOCS + 4


def test_other_encoder_cannot_add_to_the_index_but_search_uses_the_index_encoder(
    text_home_copy: Path, tmp_path: Path, minilm_path: Path
) -> None:
    from suwen.config import Settings

    other = Settings(
        home=text_home_copy, text_encoder=str(tmp_path / "another-model"), device="cpu"
    )
    with TextSearcher.open(other, TEXT_INDEX) as searcher:  # the index's own MiniLM is here
        assert searcher.settings.query_encoder == str(minilm_path.resolve())
        assert searcher.search("lung cancer screening", 3)
    source = _jsonl(tmp_path / "a.jsonl", [{"pmid": "1", "title": "t", "abstract": "a"}])
    with pytest.raises(IndexMismatchError):
        build_text_index(other, TEXT_INDEX, [source])


def test_pdf_hits_name_their_page(text_home_copy: Path, minilm_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "guideline.pdf"
    write_pdf(
        path, ["Introduction to the hospital guideline.", "Warfarin dosing in elderly patients."]
    )
    settings = text_settings_for(text_home_copy, minilm_path)
    report = build_text_index(settings, TEXT_INDEX, [path])
    assert report.sources[0].added == 1 and report.sources[0].format == "pdf"
    with TextSearcher.open(settings, TEXT_INDEX) as searcher:
        hit = searcher.search("warfarin dose for old people", 1)[0]
    assert hit.pmid is not None and hit.pmid.startswith("pdf-")
    assert hit.page == 2 and hit.as_search_json()["page"] == 2
    assert hit.title == "guideline"


def _make_schema_1(version: Path) -> None:
    """Turn a version into what Suwen wrote before bm25/: an FTS5 table, no tantivy index, and
    a manifest without file digests."""
    db = sqlite3.connect(version / TEXT_DB)
    try:
        create_fts5_table(db)
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.commit()
    finally:
        db.close()
    shutil.rmtree(version / bm25.BM25_DIR)
    manifest = json.loads((version / store.MANIFEST).read_text())
    del manifest["files"]
    (version / store.MANIFEST).write_text(json.dumps(manifest))


def test_an_index_from_before_bm25_dir_is_refused_with_rebuild(
    text_home_copy: Path, minilm_path: Path, tmp_path: Path
) -> None:
    settings = text_settings_for(text_home_copy, minilm_path)
    _make_schema_1(_live(text_home_copy))
    with pytest.raises(IndexDamagedError, match=r"older Suwen.*build the index again"):
        TextSearcher.open(settings, TEXT_INDEX)
    source = _jsonl(tmp_path / "new.jsonl", [{"pmid": "1", "title": "T", "abstract": "A."}])
    with pytest.raises(IndexDamagedError, match=r"older Suwen"):  # nor built upon
        build_text_index(settings, TEXT_INDEX, [source])


def test_a_version_without_any_bm25_index_is_refused_clearly(
    text_home_copy: Path, minilm_path: Path
) -> None:
    shutil.rmtree(_live(text_home_copy) / bm25.BM25_DIR)
    with pytest.raises(IndexDamagedError, match=r"bm25/.* is missing"):
        TextSearcher.open(text_settings_for(text_home_copy, minilm_path), TEXT_INDEX)
