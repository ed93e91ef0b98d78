"""Session fixtures for the text layer: a small real corpus cut from ../shared/data and a MiniLM
text index built from it once per session (tests that change an index work on a copy)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from suwen.config import Settings

TEXT_INDEX = "pubmed"
PUBMEDQA_DOCS = 60
PUBTATOR_DOCS = 60


def _pubtator_head(source: Path, count: int) -> str:
    """The first ``count`` articles of a PubTator file (blocks are separated by blank lines)."""
    blocks = [b for b in source.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    return "\n\n".join(blocks[:count]) + "\n"


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A folder with a PubMedQA subset, a PubTator subset and the PubMed XML record."""
    folder = tmp_path_factory.mktemp("text_corpus")
    pqal = json.loads((shared_data / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    subset = dict(sorted(pqal.items())[:PUBMEDQA_DOCS])
    (folder / "pubmedqa_subset.json").write_text(json.dumps(subset), encoding="utf-8")
    ncbi = shared_data / "abstracts" / "ncbi_disease" / "NCBIdevelopset_corpus.txt"
    (folder / "ncbi_subset.txt").write_text(_pubtator_head(ncbi, PUBTATOR_DOCS), encoding="utf-8")
    shutil.copy(shared_data / "pubmed_xml" / "pubmed-29768149.xml", folder / "pubmed.xml")
    return folder


@pytest.fixture(scope="session")
def pubmedqa_subset(text_corpus: Path) -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = json.loads(
        (text_corpus / "pubmedqa_subset.json").read_text(encoding="utf-8")
    )
    return data


def write_pdf(path: Path, pages: list[str], title: str = "") -> None:
    """A real PDF with one line of text per page (pymupdf)."""
    import pymupdf

    opener: Any = pymupdf.open
    pdf = opener()
    for text in pages:
        pdf.new_page().insert_text((72, 72), text)
    if title:
        pdf.set_metadata({"title": title})
    pdf.save(str(path))
    pdf.close()


def text_settings_for(home: Path, minilm_path: Path, **values: object) -> Settings:
    return Settings(home=home, text_encoder=str(minilm_path), device="cpu", **values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def text_index_home(
    tmp_path_factory: pytest.TempPathFactory, text_corpus: Path, minilm_path: Path
) -> Path:
    """A data home holding the MiniLM index ``pubmed`` of ``text_corpus`` (built once)."""
    from suwen.indexes.text_index import build_text_index

    home = tmp_path_factory.mktemp("text_home")
    report = build_text_index(text_settings_for(home, minilm_path), TEXT_INDEX, [text_corpus])
    assert not report.errors, report.errors
    assert report.documents == PUBMEDQA_DOCS + PUBTATOR_DOCS + 1
    return home


@pytest.fixture(scope="session")
def text_settings(text_index_home: Path, minilm_path: Path) -> Settings:
    """Settings for the shared, read-only session index."""
    return text_settings_for(text_index_home, minilm_path)


@pytest.fixture()
def text_home_copy(text_index_home: Path, tmp_path: Path) -> Path:
    """A private copy of the session data home, for tests that change the index."""
    home = tmp_path / "home"
    shutil.copytree(text_index_home, home)
    return home


def bm25_chunk_ids(version: Path) -> list[int]:
    """Every chunk id in a version's BM25 index, sorted."""
    import tantivy

    from suwen.indexes.bm25 import BM25_DIR

    searcher = tantivy.Index.open(str(version / BM25_DIR)).searcher()
    found = searcher.search(tantivy.Query.all_query(), max(searcher.num_docs, 1), count=False)
    return sorted(searcher.fast_field_values("id", [address for _, address in found.hits]))
