"""Small in-memory searchers with the shapes of the real TextSearcher and ImageSearcher."""

from __future__ import annotations

import re
import threading
from collections.abc import Collection
from dataclasses import dataclass, field

from PIL import Image

from suwen.errors import SuwenError
from suwen.types import ImageHit, TextHit, TextMethod


def text_hit(pmid: str, title: str, text: str, chunk: int = 0, year: int | None = 2020) -> TextHit:
    return TextHit(
        key=f"pmid:{pmid}#{chunk}",
        score=0.0,
        index="pubmed",
        source="fake.txt",
        text=text,
        pmid=pmid,
        chunk_id=f"{pmid}#{chunk}",
        title=title,
        year=year,
    )


def case_hit(case_id: str, caption: str) -> ImageHit:
    return ImageHit(
        key=f"case:{case_id}",
        score=0.0,
        index="images",
        text=caption,
        case_id=case_id,
        path=f"/cases/{case_id}.jpg",
        modality="CT",
        body_part="chest",
        methods=["image"],
    )


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]{3,}", text.lower()))


@dataclass
class FakeTextSearch:
    """Scores passages by words shared with the query; records every call (thread-safe)."""

    passages: list[TextHit]
    fail: SuwenError | None = None
    calls: list[tuple[str, int, str, frozenset[str]]] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def search(
        self,
        query: str,
        k: int = 10,
        *,
        method: TextMethod = "hybrid",
        exclude_pmids: Collection[str] = (),
    ) -> list[TextHit]:
        with self._lock:
            self.calls.append((query, k, method, frozenset(exclude_pmids)))
            self.threads.add(threading.get_ident())
        if self.fail is not None:
            raise self.fail
        wanted = _words(query)
        scored = [
            (len(wanted & _words(f"{hit.title} {hit.text}")), hit)
            for hit in self.passages
            if hit.pmid not in exclude_pmids
        ]
        ranked = sorted((pair for pair in scored if pair[0] > 0), key=lambda p: -p[0])
        return [
            hit.model_copy(update={"score": float(score), "methods": ["dense", "bm25"]})
            for score, hit in ranked[:k]
        ]

    @property
    def queries(self) -> list[str]:
        return [call[0] for call in self.calls]


@dataclass
class FakeImageSearch:
    """Returns its cases in order, skipping those whose image hash is excluded."""

    cases: list[tuple[ImageHit, str]]  # (hit, sha256 of the case image)
    calls: list[tuple[tuple[int, int], int, frozenset[str]]] = field(default_factory=list)

    def search_image(
        self, image: Image.Image, k: int = 5, *, exclude_sha256: Collection[str] = ()
    ) -> list[ImageHit]:
        self.calls.append((image.size, k, frozenset(exclude_sha256)))
        kept = [hit for hit, sha in self.cases if sha not in exclude_sha256]
        return [hit.model_copy(update={"score": 1.0 - i / 10}) for i, hit in enumerate(kept[:k])]
