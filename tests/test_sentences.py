"""One sentence rule (suwen/sentences.py) for indexed text and for checked answers."""

from __future__ import annotations

from suwen.agent.answers import answer_sentences, uncited_claims
from suwen.sentences import split_sentences


def test_abbreviations_do_not_end_a_sentence_in_an_answer_either() -> None:
    """An answer's claim with "e.g." or "et al." is one claim, cited once at its end."""
    text = "Drains, e.g. A chest tube, are placed early [1]. Smith et al. Found the same."
    assert uncited_claims(text) == ["Smith et al. Found the same."]


def test_citations_after_the_stop_stay_with_their_sentence_in_indexed_text() -> None:
    text = 'Risk rose. [12] Mortality fell.\n"Quoted" start. 3 patients died.'
    assert split_sentences(text) == [
        "Risk rose. [12]",
        "Mortality fell.",
        '"Quoted" start.',
        "3 patients died.",
    ]


def test_list_markers_are_an_answer_matter_only() -> None:
    text = "- First point here.\n2. Second point here."
    assert answer_sentences(text) == ["First point here.", "Second point here."]
    assert split_sentences(text)[0] == "- First point here."  # indexed text is kept as written
