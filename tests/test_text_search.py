"""Searching the session MiniLM index: hits, exclusions, query syntax, threads, rerank."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from suwen.config import Settings
from suwen.errors import IndexDamagedError
from suwen.indexes.chunking import embedding_text
from suwen.retrieval.fusion import (
    linear_fusion,
    max_normalise,
    reciprocal_rank_fusion,
    z_normalise,
)
from suwen.retrieval.text import TextSearcher, _best_chunk_per_article, _scored
from tests.fixtures_text import TEXT_INDEX

ASTHMA = "as-needed budesonide-formoterol in mild asthma"


@pytest.fixture(scope="module")
def searcher(text_settings: Settings) -> Iterator[TextSearcher]:
    with TextSearcher.open(text_settings, TEXT_INDEX) as opened:
        yield opened


@pytest.mark.parametrize("method", ["hybrid", "dense", "bm25"])
def test_each_method_finds_the_article(searcher: TextSearcher, method: str) -> None:
    hits = searcher.search(ASTHMA, 5, method=method)  # type: ignore[arg-type]
    assert hits[0].pmid == "29768149"
    assert hits[0].key == f"pmid:29768149#{hits[0].chunk_id.split('#')[1]}"  # type: ignore[union-attr]
    assert hits[0].kind == "text" and hits[0].index == TEXT_INDEX
    assert hits[0].title == "Inhaled Combined Budesonide-Formoterol as Needed in Mild Asthma."
    assert hits[0].year == 2018 and hits[0].journal
    assert hits[0].source.endswith("pubmed.xml")
    assert method in hits[0].methods or method == "hybrid"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len({h.pmid for h in hits}) == len(hits)  # one hit per article


def test_hybrid_records_which_retrievers_found_a_hit(searcher: TextSearcher) -> None:
    top = searcher.search(ASTHMA, 1)[0]
    assert set(top.methods) == {"dense", "bm25"}


def test_pubmedqa_questions_find_their_abstract(
    searcher: TextSearcher, pubmedqa_subset: dict[str, dict[str, object]]
) -> None:
    """The real task on the session subset: the question's own article ranks first."""
    found = sum(
        searcher.search(str(record["QUESTION"]), 1)[0].pmid == pmid
        for pmid, record in pubmedqa_subset.items()
    )
    assert found / len(pubmedqa_subset) >= 0.95


def test_exclude_pmids_removes_every_chunk_of_an_article(searcher: TextSearcher) -> None:
    for method in ("hybrid", "dense", "bm25"):
        hits = searcher.search(ASTHMA, 10, method=method, exclude_pmids={"29768149"})  # type: ignore[arg-type]
        assert hits and all(h.pmid != "29768149" for h in hits)


def test_k_and_empty_queries(searcher: TextSearcher) -> None:
    assert len(searcher.search("genetic disease mutation", 7)) == 7
    assert searcher.search("", 5) == []
    assert searcher.search("   ", 5) == []
    assert searcher.search("the of and", 3, method="bm25") != []  # stopwords only: kept


@pytest.mark.parametrize(
    "query",
    [
        'unbalanced "quote',
        "(parentheses) AND OR NOT NEAR(a b, 3)",
        "title: column filter * ^ caret",
        "budesonide-formoterol -x +y",
        "NEAR",
        "\"\" '' ``",
        "日本語のクエリ",
        "!!!",
    ],
)
def test_fts_syntax_in_user_text_never_breaks_search(searcher: TextSearcher, query: str) -> None:
    for method in ("bm25", "hybrid"):
        searcher.search(query, 3, method=method)  # type: ignore[arg-type]


@given(st.text(max_size=80))
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_text_is_a_valid_bm25_query(searcher: TextSearcher, text: str) -> None:
    hits = searcher.search(text, 3, method="bm25")
    assert len(hits) <= 3


def test_concurrent_searches_match_sequential(searcher: TextSearcher) -> None:
    queries = [ASTHMA, "complement deficiency mutation", "mitochondria lace plant", "G6PD"] * 4
    expected = [[h.key for h in searcher.search(q, 5)] for q in queries]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda q: [h.key for h in searcher.search(q, 5)], queries))
    assert got == expected


def test_hybrid_fuses_the_same_lists_as_dense_and_bm25_searched_one_after_the_other(
    searcher: TextSearcher,
) -> None:
    """BM25 runs beside the query's encoding; the fused ranking is the one of the two lists."""
    question = "Does aspirin reduce the risk of colorectal cancer?"
    depth = searcher.fusion.depth
    lists = {"dense": searcher.dense(question, depth), "bm25": searcher.bm25(question, depth)}
    fused = _best_chunk_per_article(searcher._combine(lists), lists)[:10]
    hits = searcher.search(question, 10, method="hybrid")
    assert [hit.score for hit in hits] == pytest.approx([score for _, score in fused])
    rows = searcher._rows([chunk_id for chunk_id, _ in fused])
    assert [hit.key for hit in hits] == [
        f"pmid:{rows[chunk_id].pmid}#{rows[chunk_id].chunk_no}" for chunk_id, _ in fused
    ]


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_dense_search_finds_the_best_articles_of_the_whole_depth(
    searcher: TextSearcher, k: int
) -> None:
    """Dense alone looks at twice k chunks first, not the fusion depth: the same hits."""
    for question in (ASTHMA, "Does aspirin reduce the risk of colorectal cancer?", "G6PD"):
        full = searcher.dense(question, max(searcher.fusion.depth, 2 * k))
        best = _best_chunk_per_article(_scored(full), {"dense": full})[:k]
        rows = searcher._rows([chunk_id for chunk_id, _ in best])
        hits = searcher.search(question, k, method="dense")
        assert [hit.key for hit in hits] == [
            f"pmid:{rows[chunk_id].pmid}#{rows[chunk_id].chunk_no}" for chunk_id, _ in best
        ]
        assert [hit.score for hit in hits] == pytest.approx([score for _, score in best])


def test_dense_search_looks_at_the_whole_depth_when_the_first_chunks_hold_too_few_articles(
    searcher: TextSearcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    depths = _dense_looks(searcher, monkeypatch, one_article_looks=1)
    hits = searcher.search(ASTHMA, 5, method="dense")
    assert depths == [10, searcher.fusion.depth]
    assert len(hits) == 5 and len({hit.pmid for hit in hits}) == 5


def test_dense_search_asked_for_the_whole_depth_searches_once(
    searcher: TextSearcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    depths = _dense_looks(searcher, monkeypatch, one_article_looks=2)
    k = searcher.fusion.depth // 2 + 1  # twice k is already the whole depth
    assert len(searcher.search(ASTHMA, k, method="dense")) == 1
    assert depths == [2 * k]


def _dense_looks(
    searcher: TextSearcher, monkeypatch: pytest.MonkeyPatch, one_article_looks: int
) -> list[int]:
    """The depths the searcher's dense retriever is asked for, recorded as it is asked; its
    first ``one_article_looks`` answers keep only the chunks of their best article."""
    real = searcher.dense
    depths: list[int] = []

    def looked(query: str, depth: int, excluded: Collection[int] = ()) -> list[Any]:
        depths.append(depth)
        found = real(query, depth, excluded)
        if len(depths) <= one_article_looks:
            return [c for c in found if c.article == found[0].article]
        return found

    monkeypatch.setattr(searcher, "dense", looked)
    return depths


def test_fusion_rules() -> None:
    dense = [("a", 0.9), ("b", 0.5), ("c", 0.4)]
    bm25 = [("c", 20.0), ("a", 10.0)]
    assert max_normalise(bm25) == {"c": 1.0, "a": 0.5}
    assert z_normalise(bm25) == {"c": 1.0, "a": -1.0}
    weights = {"dense": 0.5, "bm25": 0.5}
    fused = dict(linear_fusion({"dense": dense, "bm25": bm25}, weights, normalise="max"))
    assert fused["a"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    # "b" is missing from the BM25 list: it gets that list's lowest normalised score.
    assert fused["b"] == pytest.approx(0.5 * 0.5 / 0.9 + 0.5 * 0.5)
    z = linear_fusion({"dense": dense, "bm25": bm25}, {"dense": 0.8, "bm25": 0.2})
    assert [key for key, _ in z] == ["a", "c", "b"]
    rrf = reciprocal_rank_fusion({"dense": dense, "bm25": bm25})
    assert rrf[0][0] == "a" and rrf[0][1] == pytest.approx(1 / 61 + 1 / 62)


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A cross-encoder built offline from MiniLM's weights (its score head is untrained)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("cross_encoder")
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path), num_labels=1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_path)).save_pretrained(folder)
    return folder


def test_rerank_reorders_by_cross_encoder_scores(
    text_settings: Settings, tiny_cross_encoder: Path
) -> None:
    from sentence_transformers import CrossEncoder

    reranking = text_settings.model_copy(
        update={"rerank": True, "cross_encoder": str(tiny_cross_encoder)}
    )
    with TextSearcher.open(reranking, TEXT_INDEX) as searcher:
        hits = searcher.search("genetic mutation causing deficiency", 5)
    assert len(hits) == 5 and all("rerank" in h.methods for h in hits)
    model = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    pairs = [
        ("genetic mutation causing deficiency", embedding_text(h.title or "", h.text)) for h in hits
    ]
    expected = [float(s) for s in model.predict(pairs)]
    assert [h.score for h in hits] == pytest.approx(expected, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_article_keys_group_chunks_and_stale_keys_are_refused(
    text_home_copy: Path, minilm_path: Path, text_settings: Settings
) -> None:
    """The build writes chunk -> article keys; a version whose keys are stale (fewer ids than
    chunks) is refused even when its manifest records the stale file."""
    import numpy as np

    from suwen.indexes import article_keys, store
    from tests.fixtures_text import text_settings_for

    settings = text_settings_for(text_home_copy, minilm_path)
    version, manifest = store.open_version(settings.indexes_dir, TEXT_INDEX)
    keys = np.load(version / article_keys.ARTICLE_KEYS)
    db = sqlite3.connect(version / "text.sqlite")
    rows = db.execute("SELECT id, pmid FROM chunks").fetchall()
    db.close()
    assert int((keys >= 0).sum()) == len(rows) == manifest.count
    by_pmid: dict[str, set[int]] = {}
    for chunk_id, pmid in rows:
        by_pmid.setdefault(pmid, set()).add(int(keys[chunk_id]))
    assert all(len(found) == 1 for found in by_pmid.values())  # one key per article
    assert len({next(iter(found)) for found in by_pmid.values()}) == len(by_pmid)  # distinct
    assert any(np.bincount(keys[keys >= 0]) > 1)  # the corpus has multi-chunk articles

    np.save(version / article_keys.ARTICLE_KEYS, keys[:-3])
    store.seal(version)
    with pytest.raises(IndexDamagedError, match=r"article_keys\.npy: keys for"):
        TextSearcher.open(settings, TEXT_INDEX)
