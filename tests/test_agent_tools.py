"""The tools the agent calls: typed adapters that search off the event loop and keep provenance."""

from __future__ import annotations

import asyncio
import threading

from PIL import Image

from suwen.tools.cases import similar_cases
from suwen.tools.pubmed import search_pubmed
from suwen.types import TextHit
from tests.agent_helpers import cases, corpus
from tests.fake_search import FakeImageSearch, FakeTextSearch


def test_search_pubmed_runs_hybrid_in_a_worker_thread() -> None:
    searcher = FakeTextSearch(corpus())
    hits = asyncio.run(search_pubmed(searcher, "tension pneumothorax", k=1, exclude_pmids=["111"]))
    assert [hit.key for hit in hits] == ["pmid:444#0"]
    assert hits[0].found_by == ["tension pneumothorax"]
    assert searcher.calls == [("tension pneumothorax", 1, "hybrid", frozenset({"111"}))]
    assert threading.get_ident() not in searcher.threads


def test_search_pubmed_queries_run_concurrently() -> None:
    searcher = FakeTextSearch(corpus())

    async def three() -> list[list[TextHit]]:
        queries = ("tension", "chest tube", "diabetes")
        return list(await asyncio.gather(*(search_pubmed(searcher, q, k=2) for q in queries)))

    results = asyncio.run(three())
    assert [len(r) for r in results] == [2, 2, 1]
    assert sorted(searcher.queries) == ["chest tube", "diabetes", "tension"]


def test_similar_cases_searches_each_image_and_labels_it() -> None:
    searcher = FakeImageSearch(cases())
    images = [("a.png", Image.new("RGB", (8, 8))), ("b.png", Image.new("RGB", (4, 4)))]
    hits = asyncio.run(similar_cases(searcher, images, k=1, exclude_sha256=["a" * 64]))
    assert [(hit.key, hit.found_by) for hit in hits] == [
        ("case:synpic2", ["similar to a.png"]),
        ("case:synpic2", ["similar to b.png"]),
    ]
    assert [call[0] for call in searcher.calls] == [(8, 8), (4, 4)]


def test_similar_cases_without_images_or_budget_searches_nothing() -> None:
    searcher = FakeImageSearch(cases())
    image = [("a.png", Image.new("RGB", (8, 8)))]
    assert asyncio.run(similar_cases(searcher, [], k=4)) == []
    assert asyncio.run(similar_cases(searcher, image, k=0)) == []
    assert searcher.calls == []
