"""Search a PubMed text index: dense (FAISS), BM25 (tantivy) or both fused.

A :class:`TextSearcher` opens the live version of an index once and can then be used from many
threads at a time (the agent searches concurrently through ``asyncio.to_thread``): FAISS reads
are thread-safe, the SQLite connection is guarded by a lock, and the encoders lock their own
tokenizers.

Results are one hit per article -- its best-matching chunk -- so ``k`` hits are ``k`` different
articles (or PDFs); the chunk (and page, for PDFs) says where in the article the match is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from suwen.config import Settings
from suwen.errors import IndexMismatchError, ModelError
from suwen.indexes import article_keys, vectors
from suwen.indexes.chunking import embedding_text
from suwen.indexes.text_encoder import QueryEncoder, query_encoder, resolve_device
from suwen.indexes.text_store import ChunkRow, TextStore
from suwen.models import resolve_query_encoder
from suwen.retrieval.bm25 import STOPWORDS, Bm25Searcher, query_words
from suwen.retrieval.fusion import Normaliser, linear_fusion, reciprocal_rank_fusion
from suwen.types import TextHit, TextMethod

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder


QUERY_CACHE_SIZE = 2048
RERANK_POOL = 30  # articles the cross-encoder re-scores, at least


@dataclass(frozen=True)
class FusionConfig:
    """How hybrid search mixes its two lists.

    Chosen with ``benchmarks/retrieval.py`` (MiniLM over PubMedQA's abstracts, its questions
    and paraphrases of them; the README has the table): z-score linear fusion. Each list's
    top ``depth`` chunk scores are standardised by their own mean and spread, then mixed 0.8
    dense + 0.2 BM25. Naive RRF ranks the gold abstract first more often than dense alone but
    loses at recall@10, because it treats a clear dense winner and a near-tie alike; z-scores
    keep that confidence, and BM25 then only breaks near-ties with exact-term evidence (drug
    names, gene symbols).
    The dense weight was chosen where it met the target on both halves of PubMedQA (official
    test split and the rest) and kept hybrid ahead of dense on the paraphrases, where BM25 is
    weak by construction. Fixed, not tuned per query.
    """

    kind: Literal["linear", "rrf"] = "linear"
    weights: dict[str, float] = field(default_factory=lambda: {"dense": 0.8, "bm25": 0.2})
    normalise: Normaliser = "z"
    depth: int = 200  # chunks taken from each retriever (the z-score statistics use them all)


@dataclass(frozen=True)
class Candidate:
    chunk_id: int
    article: int  # equal for chunks of one article (see suwen.indexes.article_keys)
    score: float


class TextSearcher:
    """Dense, BM25 and hybrid search over one text index version."""

    def __init__(
        self,
        settings: Settings,
        text_store: TextStore,
        encoder: QueryEncoder,
        fusion: FusionConfig | None = None,
    ) -> None:
        self.settings = settings
        self.manifest = text_store.manifest
        self.name = text_store.manifest.name
        self.fusion = fusion or FusionConfig()
        self._store = text_store
        self._db_lock = threading.Lock()
        self._index = text_store.vectors
        self._encoder = encoder
        self._article_keys = text_store.keys
        self._bm25 = Bm25Searcher(text_store.bm25)
        self._vector_cache: OrderedDict[str, vectors.FloatArray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cross: CrossEncoder | None = None
        self._cross_lock = threading.Lock()
        # Hybrid search runs BM25 here while the calling thread encodes the query: both
        # release the GIL (tantivy and ONNX Runtime), so on two cores they overlap.
        self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suwen-bm25")

    @classmethod
    def open(cls, settings: Settings, name: str | None = None) -> TextSearcher:
        """The live version of text index ``name`` (default: ``settings.text_index``)."""
        text_store = TextStore.open(settings.indexes_dir, name or settings.text_index)
        try:
            manifest = text_store.manifest
            settings = resolve_query_encoder(manifest, settings, "text").settings  # own if local
            encoder = query_encoder(settings)
            if encoder.dim != manifest.dim:
                raise IndexMismatchError(
                    f"index {manifest.name!r} holds {manifest.dim}-d vectors but query encoder "
                    f"{settings.query_encoder!r} makes {encoder.dim}-d ones"
                )
        except BaseException:
            text_store.close()
            raise
        return cls(settings, text_store, encoder)

    def close(self) -> None:
        self._beside.shutdown(wait=True)
        with self._db_lock:
            self._store.close()

    def __enter__(self) -> TextSearcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the two retrievers ------------------------------------------------------------------

    def dense(self, query: str, depth: int, excluded: Collection[int] = ()) -> list[Candidate]:
        """Chunks nearest to the query embedding, best first; ``excluded`` chunk ids never."""
        vector = self._query_vector(query)
        scores, ids = self._index.search(vector, depth + len(excluded))
        return self._candidates(ids[0], scores[0], excluded)[:depth]

    def _query_vector(self, query: str) -> vectors.FloatArray:
        """The query's embedding; recent ones are kept (agents and benchmarks repeat queries)."""
        with self._cache_lock:
            cached = self._vector_cache.get(query)
            if cached is not None:
                self._vector_cache.move_to_end(query)
                return cached
        vector = self._encoder.encode_query(query)
        with self._cache_lock:
            self._vector_cache[query] = vector
            while len(self._vector_cache) > QUERY_CACHE_SIZE:
                self._vector_cache.popitem(last=False)
        return vector

    def bm25(self, query: str, depth: int, excluded: Collection[int] = ()) -> list[Candidate]:
        """Chunks ranked by BM25 over title and text, best first. Enough extra chunks are taken
        to drop the ``excluded`` chunk ids afterwards, so the result is the same."""
        words = query_words(query, STOPWORDS)
        found = self._bm25.search(words, depth + len(excluded))
        ids, scores = [chunk_id for chunk_id, _ in found], [score for _, score in found]
        return self._candidates(ids, scores, excluded)[:depth]

    def _candidates(
        self, chunk_ids: Sequence[int], scores: Sequence[float], excluded: Collection[int]
    ) -> list[Candidate]:
        """Candidates with their article keys, in the given order; excluded chunks, FAISS's -1
        padding and ids without a chunk are dropped."""
        keys = article_keys.lookup(self._article_keys, chunk_ids).tolist()
        # Python ints and floats first: a numpy scalar per element costs more than the rest.
        ids, values = np.asarray(chunk_ids).tolist(), np.asarray(scores, dtype=np.float64).tolist()
        return [
            Candidate(chunk_id, key, score)
            for chunk_id, key, score in zip(ids, keys, values, strict=True)
            if key >= 0 and chunk_id not in excluded
        ]

    # -- search -------------------------------------------------------------------------------

    def search(
        self,
        query: str,
        k: int = 10,
        *,
        method: TextMethod = "hybrid",
        exclude_pmids: Collection[str] = (),
    ) -> list[TextHit]:
        """The ``k`` best articles for ``query``, one hit (best chunk) each.

        ``exclude_pmids`` are never returned (benchmarks exclude the question's own source).
        With ``settings.rerank`` the fused candidates are re-scored by the cross-encoder.
        """
        if k < 1 or not query.strip():
            return []
        depth = max(self.fusion.depth, 2 * k)
        rerank = self.settings.rerank
        wanted = max(k, RERANK_POOL) if rerank else k
        lists: dict[str, list[Candidate]] = {}
        excluded = self._chunk_ids_of(exclude_pmids)
        if method == "hybrid":
            lists = self._both(query, depth, excluded)
        elif method == "dense":
            lists["dense"] = self._dense_articles(query, wanted, depth, excluded)
        else:
            lists["bm25"] = self.bm25(query, depth, excluded)
        ranked = self._combine(lists) if method == "hybrid" else _scored(lists[method])
        best = _best_chunk_per_article(ranked, lists)
        hits = self._hits(best[:wanted], lists)
        if rerank:
            hits = self._rerank(query, hits)
        return hits[:k]

    def _dense_articles(
        self, query: str, wanted: int, depth: int, excluded: Collection[int]
    ) -> list[Candidate]:
        """Dense candidates holding the ``wanted`` best articles: without fusion there is no
        need for ``depth`` of them, so first twice ``wanted`` chunks (most articles are one),
        and the whole depth only when those hold fewer articles (the query's vector is
        cached, so only the index is searched again)."""
        first_depth = min(depth, 2 * wanted)
        first = self.dense(query, first_depth, excluded)
        if first_depth == depth or len({c.article for c in first}) >= wanted:
            return first
        return self.dense(query, depth, excluded)

    def _both(
        self, query: str, depth: int, excluded: Collection[int]
    ) -> dict[str, list[Candidate]]:
        """Dense and BM25 candidates, BM25 searched beside the query's encoding."""
        bm25: Future[list[Candidate]] = self._beside.submit(self.bm25, query, depth, excluded)
        try:
            dense = self.dense(query, depth, excluded)
        finally:
            found = bm25.result()
        return {"dense": dense, "bm25": found}

    def _combine(self, lists: dict[str, list[Candidate]]) -> list[tuple[int, float]]:
        scored = {name: _scored(found) for name, found in lists.items()}
        if self.fusion.kind == "rrf":
            return reciprocal_rank_fusion(scored, self.fusion.weights)
        return linear_fusion(scored, self.fusion.weights, normalise=self.fusion.normalise)

    # -- rows to hits -------------------------------------------------------------------------

    def _hits(
        self, ranked: Sequence[tuple[int, float]], lists: dict[str, list[Candidate]]
    ) -> list[TextHit]:
        rows = self._rows([chunk_id for chunk_id, _ in ranked])
        members = {name: {c.chunk_id for c in found} for name, found in lists.items()}
        return [
            _hit(
                rows[chunk_id],
                score,
                self.name,
                [n for n, ids in members.items() if chunk_id in ids],
            )
            for chunk_id, score in ranked
            if chunk_id in rows
        ]

    def _rows(self, chunk_ids: Sequence[int]) -> dict[int, ChunkRow]:
        with self._db_lock:
            return self._store.rows.rows(chunk_ids)

    def _chunk_ids_of(self, pmids: Collection[str]) -> set[int]:
        with self._db_lock:
            return self._store.rows.chunk_ids_of(pmids)

    # -- reranking ----------------------------------------------------------------------------

    def _rerank(self, query: str, hits: list[TextHit]) -> list[TextHit]:
        if not hits:
            return hits
        pairs = [(query, embedding_text(hit.title or "", hit.text)) for hit in hits]
        with self._cross_lock:
            model = self._cross_encoder()
            scores = model.predict(pairs, show_progress_bar=False)
        rescored = [
            hit.model_copy(update={"score": float(score), "methods": [*hit.methods, "rerank"]})
            for hit, score in zip(hits, scores, strict=True)
        ]
        return sorted(rescored, key=lambda hit: hit.score, reverse=True)

    def _cross_encoder(self) -> CrossEncoder:
        if self._cross is None:
            from sentence_transformers import CrossEncoder

            name = self.settings.cross_encoder
            source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
            try:
                self._cross = CrossEncoder(source, device=resolve_device(self.settings.device))
            except Exception as exc:  # hub, file and config errors come in many types
                raise ModelError(
                    f"cross-encoder {name!r} could not be loaded ({type(exc).__name__}); "
                    "set SUWEN_CROSS_ENCODER to a local directory or turn rerank off"
                ) from exc
        return self._cross


def _scored(found: Sequence[Candidate]) -> list[tuple[int, float]]:
    return [(c.chunk_id, c.score) for c in found]


def _best_chunk_per_article(
    ranked: Sequence[tuple[int, float]], lists: dict[str, list[Candidate]]
) -> list[tuple[int, float]]:
    """Keep each article's best-ranked chunk only."""
    article_of = {c.chunk_id: c.article for found in lists.values() for c in found}
    seen: set[int] = set()
    best = []
    for chunk_id, score in ranked:
        article = article_of[chunk_id]
        if article not in seen:
            seen.add(article)
            best.append((chunk_id, score))
    return best


def _hit(row: ChunkRow, score: float, index: str, methods: list[str]) -> TextHit:
    return TextHit(
        key=f"pmid:{row.pmid}#{row.chunk_no}",
        score=score,
        index=index,
        source=row.source,
        text=row.text,
        pmid=row.pmid,
        chunk_id=f"{row.pmid}#{row.chunk_no}",
        title=row.title,
        year=row.year,
        journal=row.journal,
        page=row.page,
        methods=methods,
    )
