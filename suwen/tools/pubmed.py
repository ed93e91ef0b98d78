"""search_pubmed: the agent's typed adapter over a PubMed text searcher.

No decisions here: the agent chooses the queries; this runs one search off the event
loop (searchers are synchronous and do CPU/IO work) and stamps each hit with the query that
found it, so the evidence keeps its provenance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Protocol

from suwen.types import TextHit, TextMethod


class TextSearch(Protocol):
    """What the agent needs from ``suwen.retrieval.text.TextSearcher`` (sync, thread-safe)."""

    def search(
        self,
        query: str,
        k: int = ...,
        *,
        method: TextMethod = ...,
        exclude_pmids: Collection[str] = ...,
    ) -> list[TextHit]: ...


async def search_pubmed(
    searcher: TextSearch,
    query: str,
    *,
    k: int,
    exclude_pmids: Collection[str] = (),
    method: TextMethod = "hybrid",
) -> list[TextHit]:
    """Search for ``query`` (hybrid dense + BM25 unless told); hits carry ``found_by=[query]``."""
    excluded = frozenset(exclude_pmids)
    hits = await asyncio.to_thread(searcher.search, query, k, method=method, exclude_pmids=excluded)
    return [hit.model_copy(update={"found_by": [query]}) for hit in hits]
