"""similar_cases: the agent's typed adapter over the image->image searcher.

The searcher is synchronous and not promised to be thread-safe, so every image of one question
is searched in turn inside a single worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from typing import Protocol

from PIL import Image

from suwen.types import ImageHit


class ImageSearch(Protocol):
    """What the agent needs from ``suwen.retrieval.images.ImageSearcher``."""

    def search_image(
        self, image: Image.Image, k: int = ..., *, exclude_sha256: Collection[str] = ...
    ) -> list[ImageHit]: ...


def _search_each(
    searcher: ImageSearch,
    images: Sequence[tuple[str, Image.Image]],
    k: int,
    exclude_sha256: frozenset[str],
) -> list[ImageHit]:
    """Each source's best ``k`` cases: a volume's views are searched one by one and a case
    scores its best match over them (suwen.volumes labels a view with its source file)."""
    from suwen.studies import role_of
    from suwen.volumes import source_of

    groups: dict[str, dict[str, ImageHit]] = {}
    for label, image in images:
        if role_of(image) == "prior":
            continue  # similar cases are sought for the study being read now
        best = groups.setdefault(source_of(image, label), {})
        for hit in searcher.search_image(image, k, exclude_sha256=exclude_sha256):
            if hit.key not in best or hit.score > best[hit.key].score:
                best[hit.key] = hit.model_copy(update={"found_by": [f"similar to {label}"]})
    hits: list[ImageHit] = []
    for best in groups.values():
        hits.extend(sorted(best.values(), key=lambda hit: hit.score, reverse=True)[:k])
    return hits


async def similar_cases(
    searcher: ImageSearch,
    images: Sequence[tuple[str, Image.Image]],
    *,
    k: int,
    exclude_sha256: Collection[str] = (),
) -> list[ImageHit]:
    """Indexed cases that look like each ``(label, image)``; hits carry ``found_by``."""
    if not images or k <= 0:
        return []
    return await asyncio.to_thread(_search_each, searcher, images, k, frozenset(exclude_sha256))
