"""Similar cases as worked examples: the images of the cases the reread kept, shown before the
question's own image(s) in the answer prompt.

Medical in-context learning helps with relevant examples and hurts with a single irrelevant
one, and the most relevant example helps most when placed last. So only cases the reread kept
(relevance at or above the threshold) are ever shown, at most ``case_examples`` of them, the
most relevant last; their captions are already in the fenced evidence block, and each example
image is labelled with its evidence number and as another patient's case. Examples count
against the server's image limit: with the question's own images they never exceed it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from suwen.errors import InputError
from suwen.types import Evidence, ImageHit


@dataclass(frozen=True)
class CaseExample:
    number: int  # the case's number in the answer's evidence block
    case_id: str
    image: Image.Image


def example_candidates(
    numbered: list[Evidence], wanted: int, question_images: int, max_images: int
) -> list[tuple[int, Evidence]]:
    """``(evidence number, item)`` of the kept image cases to show, least relevant first, at
    most ``wanted`` and no more than the image limit leaves beside the question's images."""
    room = max(0, min(wanted, max_images - question_images))
    cases = [
        (number, item)
        for number, item in enumerate(numbered, start=1)
        if item.kept and isinstance(item.hit, ImageHit) and item.hit.path
    ]
    best = sorted(cases, key=lambda pair: pair[1].relevance, reverse=True)[:room]
    return best[::-1]


def _load(candidates: list[tuple[int, Evidence]]) -> list[CaseExample]:
    from suwen.medimage import load_image  # bounded like every other image read

    examples = []
    for number, item in candidates:
        case = item.hit
        if not isinstance(case, ImageHit):
            continue
        try:
            image = load_image(Path(case.path))
        except InputError:
            continue  # a case image moved or broken since indexing: its caption still counts
        examples.append(CaseExample(number, case.case_id, image))
    return examples


async def load_examples(candidates: list[tuple[int, Evidence]]) -> list[CaseExample]:
    if not candidates:
        return []
    return await asyncio.to_thread(_load, candidates)
