"""BM25 search over a text index's tantivy index (built by ``suwen.indexes.bm25``)."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

import tantivy

from suwen.errors import IndexDamagedError

# Common English function words and the words questions are made of. BM25's IDF already
# discounts them, but in an OR query each one still pulls in thousands of weak matches.
_STOPWORD_TEXT = """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing done down during each
    either few for from further had has have having he her here hers herself him himself his
    how however i if in into is it its itself just may me might more most must my myself no nor
    not now of off on once only or other our ours ourselves out over own same shall she should
    so some such than that the their theirs them themselves then there these they this those
    through thus to too under until up upon very was we were what when where whether which
    while who whom why will with within without would you your yours yourself yourselves"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Tantivy's default tokenizer splits on anything not alphanumeric; query words split the same
# way are single terms, so a quoted word is always a term query, never a phrase.
_QUERY_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def query_words(text: str, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """The distinct content words of free text (stop words dropped unless nothing is left)."""
    words = [w.lower() for w in _QUERY_WORD.findall(text)]
    return list(dict.fromkeys([w for w in words if w not in stopwords] or words))


class Bm25Searcher:
    """Top chunks by BM25 over title and text; safe to share between threads."""

    def __init__(self, index: tantivy.Index) -> None:
        self._index = index
        self._searcher = index.searcher()
        self._lock = threading.Lock()

    def search(self, words: Sequence[str], depth: int) -> list[tuple[int, float]]:
        """``(chunk id, score)`` best first for chunks holding any of ``words``."""
        if not words or depth < 1:
            return []
        # Quoted words are plain terms: user text is never read as query syntax.
        query = self._index.parse_query(" ".join(f'"{word}"' for word in words), ["body"])
        with self._lock:
            # count=False: counting every match would disable the block skipping.
            try:
                found = self._searcher.search(query, depth, count=False).hits
                ids = self._searcher.fast_field_values("id", [address for _, address in found])
            except ValueError as exc:  # a segment file its manifest check could not catch
                raise IndexDamagedError(f"BM25 index: unreadable segment ({exc})") from exc
        return [
            (int(chunk_id), float(score))
            for (score, _), chunk_id in zip(found, ids, strict=True)
            if chunk_id is not None
        ]
