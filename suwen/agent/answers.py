"""Pure text checks on what the model wrote: citations, sentences, short answers, quotes.

No model calls and no state here, so every rule the **verify** and **answer** steps apply can
be tested on strings alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from suwen.sentences import CITATION, split_sentences
from suwen.types import AnswerFormat

_CITATION = re.compile(CITATION)
_LIST_MARKER = re.compile(r"^[ \t]*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
_SHORT_LINE = re.compile(
    r"(?:^|(?<=\s))[*_>#-]*\bshort[ -]answer[\s*_]*[:：][ \t*_]*(?P<value>.*?)[\s*_.]*$",
    re.IGNORECASE | re.MULTILINE,
)
_WORD = re.compile(r"[a-z0-9]+")
MIN_CLAIM_WORDS = 4
MAX_QUERY_WORDS = 12
MAX_QUERY_CHARS = 120
SHORT_REPLY_WORDS = 8


@dataclass
class CheckedCitations:
    text: str  # the answer with invalid citation numbers removed
    cited: list[int] = field(default_factory=list)  # valid numbers, in order of first use
    removed: list[str] = field(default_factory=list)  # invalid numbers as written, e.g. "7"


def _numbers(spec: str) -> list[int]:
    """'1, 3-5' -> [1, 3, 4, 5]; a range longer than 20 is read as its two ends."""
    numbers: list[int] = []
    for part in re.split(r"\s*[,;]\s*", spec.strip()):
        bounds = [int(b) for b in re.split(r"\s*[–-]\s*", part)]
        if len(bounds) == 2 and bounds[0] <= bounds[1] <= bounds[0] + 20:
            numbers.extend(range(bounds[0], bounds[1] + 1))
        else:
            numbers.extend(bounds)
    return numbers


def check_citations(text: str, available: int) -> CheckedCitations:
    """Keep citations numbered 1..``available``; drop the rest and report them."""
    result = CheckedCitations(text="")

    def rewrite(match: re.Match[str]) -> str:
        numbers = _numbers(match.group(1))
        valid = [n for n in numbers if 1 <= n <= available]
        result.removed.extend(str(n) for n in numbers if not 1 <= n <= available)
        result.cited.extend(n for n in valid if n not in result.cited)
        if len(valid) == len(numbers):
            return match.group(0)
        return "[" + ", ".join(str(n) for n in valid) + "]" if valid else ""

    text = _CITATION.sub(rewrite, text)
    # A removed citation may leave "word ." or a double space behind.
    result.text = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", text)).strip()
    return result


def cited_numbers(sentence: str) -> list[int]:
    return [n for match in _CITATION.finditer(sentence) for n in _numbers(match.group(1))]


def answer_sentences(text: str) -> list[str]:
    """Sentences of an answer (suwen.sentences' rule), list markers ("- ", "2. ") removed;
    citations written after the full stop stay with their sentence."""
    return split_sentences(_LIST_MARKER.sub("", text))


def is_claim(sentence: str) -> bool:
    """Headings, labels and fragments are not claims that need a source."""
    bare = _CITATION.sub("", sentence).strip(" *_#")
    return not bare.endswith(":") and len(bare.split()) >= MIN_CLAIM_WORDS


def uncited_claims(text: str) -> list[str]:
    return [s for s in answer_sentences(text) if is_claim(s) and not cited_numbers(s)]


def split_short_answer(text: str) -> tuple[str, str | None]:
    """``(explanation, raw short answer)`` from an answer ending with 'Short answer: ...'."""
    matches = list(_SHORT_LINE.finditer(text))
    if not matches:
        return text.strip(), None
    last = matches[-1]
    return text[: last.start()].strip(), last.group("value").strip() or None


def _clean_phrase(value: str) -> str:
    return value.strip().strip("*_`\"'").strip().rstrip(".").strip()


def _choice_letter(value: str, options: dict[str, str]) -> str | None:
    cleaned = re.sub(r"^(?:option|answer)\s*", "", _clean_phrase(value), flags=re.IGNORECASE)
    letters = {key.upper(): key for key in options}
    match = re.match(r"^\(?([A-Za-z])\)?(?:[.):\s]|$)", cleaned)
    if match and match.group(1).upper() in letters:
        return letters[match.group(1).upper()]
    for key, option in options.items():
        if cleaned.casefold() == option.strip().casefold():
            return key
    return None


def normalize_short_answer(value: str, answer_format: AnswerFormat) -> str | None:
    """The short answer in the form the benchmark wants, or None when it is not in that form."""
    phrase = _clean_phrase(value)
    if not phrase:
        return None
    words: list[str] = _WORD.findall(phrase.casefold())
    first = words[0] if words else ""
    if answer_format.kind == "choice":
        return _choice_letter(phrase, answer_format.options)
    if answer_format.kind == "yes_no":
        return first if first in ("yes", "no", "maybe") else None
    if answer_format.kind == "closed" and first in ("yes", "no"):
        return first
    return phrase


def short_answer_of(text: str, answer_format: AnswerFormat) -> tuple[str, str | None]:
    """``(explanation, short answer)``: from the 'Short answer:' line, or from the whole reply
    when the model answered in a few words (as a plain benchmark prompt asks it to)."""
    if answer_format.kind == "free":
        return text.strip(), None
    explanation, raw = split_short_answer(text)
    if raw is not None:
        return explanation, normalize_short_answer(raw, answer_format)
    if len(text.split()) <= SHORT_REPLY_WORDS:
        return text.strip(), normalize_short_answer(text, answer_format)
    return explanation, None


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.casefold()))


def grounded_quote(quote: str, passage: str) -> str:
    """The quote if the passage really contains it, else the passage sentence closest to it
    (a judge that paraphrases must not put words in a source's mouth), else ''."""
    flat_quote = " ".join(quote.split())
    if not flat_quote:
        return ""
    if flat_quote.casefold() in " ".join(passage.split()).casefold():
        return flat_quote
    wanted = _words(flat_quote)
    best, best_overlap = "", 0.0
    for sentence in answer_sentences(passage):
        have = _words(sentence)
        overlap = len(wanted & have) / len(wanted | have) if have else 0.0
        if overlap > best_overlap:
            best, best_overlap = sentence, overlap
    return best


def clean_queries(queries: Sequence[str], limit: int, already: Sequence[str] = ()) -> list[str]:
    """Distinct, non-empty, not-yet-searched queries, at most ``limit``, each a few words."""
    seen = {q.casefold() for q in already}
    kept: list[str] = []
    for query in queries:
        query = " ".join(query.replace('"', " ").split()[:MAX_QUERY_WORDS])[:MAX_QUERY_CHARS]
        query = query.strip()
        if query and query.casefold() not in seen:
            seen.add(query.casefold())
            kept.append(query)
    return kept[:limit]
