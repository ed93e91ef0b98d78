"""Sentence splitting: one rule for the text Suwen indexes and the answers it checks.

A line break always ends a sentence. Within a line a sentence ends at ``.``, ``!`` or ``?`` --
together with any citation numbers written after the stop ("... comes first. [1]") -- followed
by space and something that can start a sentence: an upper-case letter, a digit, an opening
bracket, a quote or markdown emphasis. Common abbreviations ("e.g.", "i.e.", "et al.", "Fig.",
"vs.", "Dr.") do not end one.
"""

from __future__ import annotations

import re

# [1], [2, 3], [1-3], [2;4]: up to three digits, so a bracketed year like [2019] is not one.
CITATION = r"\[\s*(\d{1,3}(?:\s*[,;–-]\s*\d{1,3})*)\s*\]"
_CITATION_RUN = r"(?:\s*\[\s*\d{1,3}(?:\s*[,;–-]\s*\d{1,3})*\s*\])*"
_SENTENCE_END = re.compile(
    r"(?<!\be\.g)(?<!\bi\.e)(?<!\bet al)(?<!\bFig)(?<!\bvs)(?<!\bDr)[.!?]"
    + _CITATION_RUN
    + r"\s+(?=[A-Z0-9(\[\"'*])"
)


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, stripped, in order; empty lines give none."""
    sentences: list[str] = []
    for line in text.split("\n"):
        start = 0
        for match in _SENTENCE_END.finditer(line):
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return [sentence for sentence in sentences if sentence]
