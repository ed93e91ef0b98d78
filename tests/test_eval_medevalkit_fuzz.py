"""The MedEvalKit-compatible scorer stays identical to MedEvalKit's rules on a fuzzed corpus of
2,400 responses kept in the repo (tests/data/medevalkit_fuzz.jsonl, written by Suwen's own
generator tests/data/medevalkit_fuzz.py), whose recorded verdicts were re-checked against an
independent reading of MedEvalKit's rules run on the libraries MedEvalKit calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from suwen.evaluate import scoring_medevalkit as mek
from tests.data import medevalkit_fuzz as fuzz


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in fuzz.CORPUS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == fuzz.SIZE
    return rows


def _mismatches(rows: list[dict[str, Any]]) -> list[str]:
    return [
        row["id"]
        for row in rows
        if not fuzz.agrees(row["medevalkit"], fuzz.expected(row))
        or fuzz.expected(row)["crash"] != row["medevalkit"]["crash"]
    ]


def test_the_compatible_scorer_gives_every_recorded_verdict(corpus: list[dict[str, Any]]) -> None:
    assert _mismatches(corpus) == []
    kinds = {(row["family"], row["kind"]) for row in corpus}
    assert {
        ("choice", "choice"),
        ("vqa", "yes_no"),
        ("slake", "closed"),
        ("slake", "open"),
    } <= kinds
    verdicts = [row["medevalkit"] for row in corpus]
    assert any(v["crash"] for v in verdicts) and any(v["correct"] for v in verdicts)
    assert any(v["correct"] is False and not v["crash"] for v in verdicts)


def test_the_corpus_is_the_generators_output(corpus: list[dict[str, Any]]) -> None:
    again = fuzz.generate()
    assert [{k: v for k, v in row.items() if k != "medevalkit"} for row in corpus] == again


@pytest.mark.slow  # the `rouge` package and nltk on every open answer: ~10 s
def test_recorded_verdicts_follow_medevalkits_rules_on_its_own_libraries(
    corpus: list[dict[str, Any]],
) -> None:
    disagree = [
        row["id"] for row in corpus if not fuzz.agrees(row["medevalkit"], fuzz.reading(row))
    ]
    assert disagree == []


def test_a_changed_rule_is_caught(
    corpus: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def whole_words(answer: str, response: str) -> mek.MekSample:
        words = mek.parse_response(response).replace(".", " ").split()
        return mek.MekSample(correct=answer.lower() in words)

    monkeypatch.setattr(mek, "judge_judgement", whole_words)
    assert len(_mismatches(corpus)) > 20
