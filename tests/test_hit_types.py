"""Text and image hits are two types told apart by ``kind``, and what users read of them in
JSON (batch results, ``ask --json``, ``search --json``) keeps the shape it had when one flat
model held both: every key, null where it does not apply to the kind."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from suwen.types import AgentResult, Evidence, ImageHit, TextHit

# A text hit and an image hit as ``AgentResult.model_dump(mode="json")`` wrote them before.
FLAT_TEXT_HIT = {
    "key": "pmid:111#0",
    "score": 0.8,
    "kind": "text",
    "index": "pubmed",
    "source": "a.xml",
    "text": "Needle decompression comes first.",
    "pmid": "111",
    "chunk_id": "111#0",
    "title": "Tension pneumothorax",
    "year": 2020,
    "journal": "Chest",
    "page": None,
    "case_id": None,
    "path": None,
    "caption": None,
    "modality": None,
    "body_part": None,
    "methods": ["dense", "bm25"],
    "found_by": ["tension pneumothorax"],
}
FLAT_IMAGE_HIT = {
    "key": "case:synpic1",
    "score": 0.9,
    "kind": "image",
    "index": "images",
    "source": "cases.jsonl",
    "text": "Right tension pneumothorax.",
    "pmid": None,
    "chunk_id": None,
    "title": None,
    "year": None,
    "journal": None,
    "page": None,
    "case_id": "synpic1",
    "path": "/cases/synpic1.jpg",
    "caption": "Right tension pneumothorax.",
    "modality": "XR",
    "body_part": "chest",
    "methods": ["image"],
    "found_by": ["similar to chest.png"],
}


def _evidence(hit: dict[str, object]) -> dict[str, object]:
    return {"key": hit["key"], "hit": hit, "relevance": 0.7, "quote": "", "kept": True}


def test_results_written_before_load_as_the_right_kind_and_dump_unchanged() -> None:
    line = {"question": "q", "evidence": [_evidence(FLAT_TEXT_HIT), _evidence(FLAT_IMAGE_HIT)]}
    result = AgentResult.model_validate_json(json.dumps(line))

    passage, case = (item.hit for item in result.evidence)
    assert isinstance(passage, TextHit) and passage.pmid == "111" and passage.journal == "Chest"
    assert isinstance(case, ImageHit) and case.caption == "Right tension pneumothorax."
    dumped = result.model_dump(mode="json")["evidence"]
    assert [item["hit"] for item in dumped] == [FLAT_TEXT_HIT, FLAT_IMAGE_HIT]
    assert list(dumped[1]["hit"]) == list(FLAT_IMAGE_HIT)  # key order too


def test_a_hit_has_the_fields_of_its_kind_only() -> None:
    with pytest.raises(ValidationError):  # a passage names its article
        Evidence.model_validate(_evidence({**FLAT_TEXT_HIT, "pmid": None}))
    with pytest.raises(ValidationError):  # a case names its image
        Evidence.model_validate(_evidence({**FLAT_IMAGE_HIT, "path": None}))
    with pytest.raises(ValidationError):
        Evidence.model_validate(_evidence({**FLAT_TEXT_HIT, "kind": "video"}))


def test_citations_carry_what_their_kind_has() -> None:
    passage = Evidence.model_validate({**_evidence(FLAT_TEXT_HIT), "quote": "first"})
    case = Evidence.model_validate(_evidence(FLAT_IMAGE_HIT))

    cited = passage.citation(1)
    assert (cited.pmid, cited.title, cited.case_id, cited.quote) == (
        "111",
        "Tension pneumothorax",
        None,
        "first",
    )
    assert (case.citation(2).case_id, case.citation(2).pmid) == ("synpic1", None)


def test_search_json_keeps_its_shape() -> None:
    passage = TextHit.model_validate(FLAT_TEXT_HIT)
    case = ImageHit.model_validate(FLAT_IMAGE_HIT)

    assert passage.as_search_json() == {
        "id": "pmid:111#0",
        "score": 0.8,
        "source": "a.xml",
        "pmid": "111",
        "title": "Tension pneumothorax",
        "text": "Needle decompression comes first.",
        "page": None,
    }
    assert case.as_search_json() == {
        "id": "case:synpic1",
        "score": 0.9,
        "source": "cases.jsonl",
        "path": "/cases/synpic1.jpg",
        "caption": "Right tension pneumothorax.",
        "text": "Right tension pneumothorax.",
    }
