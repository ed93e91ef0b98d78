"""Suwen's scorer: MedEvalKit's metrics without its bugs (the headline numbers).

Same answer markers, same metric families (option letter, yes/no, exact match for closed
questions, token P/R/F1 and BLEU/ROUGE for open ones, the same judge prompt), but:

- yes/no is read from whole words, so "normal", "nodule" or "not" are not "no";
- a multiple-choice answer that names no option is *unparsed*: wrong, and counted;
- precision, recall and F1 come back in that order, and empty responses score 0 instead of
  crashing;
- accuracy is divided once; the judge only ever rescoring open questions, so closed ones are
  neither counted twice nor dropped.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, Field

from suwen.evaluate.scoring_medevalkit import sentence_bleu

THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "Answer:", "**Final answer**:", "the answer is", "The correct answer would be" ...
MARKER = re.compile(
    r"(?:final\s+|correct\s+|best\s+)?answer\s*(?:\*\*)?\s*(?:is|would\s+be|:|：)\s*(?:\*\*)?",
    re.IGNORECASE,
)
NEGATIONS = frozenset({"no", "not", "without", "absent", "neither", "nor", "never", "none"})
ARTICLES = frozenset({"a", "an", "the"})


class Score(BaseModel):
    """One response, scored."""

    correct: bool | None = Field(description="None for report generation (no accuracy)")
    parsed: str | None = Field(None, description="Letter, yes/no, or the normalized answer")
    unparsed: bool = Field(False, description="No answer of the required form could be read")
    metrics: dict[str, float] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Extraction shared by every kind


def boxed_content(text: str) -> str | None:
    """The content of the last balanced ``\\boxed{...}``, or None."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth = 0
    content = text[start + len("\\boxed{") :]
    for index, char in enumerate(content):
        depth += (char == "{") - (char == "}")
        if depth == -1:
            return content[:index].strip()
    return None


def extract_answer(response: str | None) -> str:
    """The part of a response that states the answer: reasoning dropped, then a boxed answer,
    an ``<answer>`` tag, or what follows the last answer marker."""
    text = THINK.sub(" ", response or "")
    boxed = boxed_content(text)
    if boxed is not None:
        return boxed.strip()
    tags = ANSWER_TAG.findall(text)
    if tags:
        return str(tags[-1]).strip()
    markers = list(MARKER.finditer(text))
    if markers:
        return text[markers[-1].end() :].strip()  # "Answer:" and nothing after: no answer
    return text.strip()


def normalize(text: str) -> str:
    """Lowercase words only: punctuation out, articles and extra spaces gone."""
    words = re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower())
    return " ".join(w for w in words if w not in ARTICLES)


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


# --------------------------------------------------------------------------------------------
# Multiple choice


def _letters_pattern(letters: Iterable[str]) -> str:
    return "[" + "".join(sorted(set(letters))) + "]"


def parse_choice(response: str | None, options: dict[str, str]) -> str | None:
    """The option letter a response chose, or None when it names none (or several)."""
    if not options:
        return None
    whole = THINK.sub(" ", response or "").replace("*", "")
    text = extract_answer(response).replace("*", "").strip()
    letters = _letters_pattern(options)
    lone = re.fullmatch(rf"[(\[]?({letters})[)\]]?[.:)]?", text, re.IGNORECASE)
    if lone:
        return lone.group(1).upper()
    # "B. Lung", "(B) lung", "B: lung", "B) lung", "B" on a line of its own: an upper-case
    # letter leading the answer ("A 45-year-old" is not one).
    leading = re.match(rf"[(\[]?({letters})(?:[)\]]|[.:),]|[ \t]*\n)", text)
    if leading:
        return leading.group(1)
    stated = re.findall(
        rf"(?:option|choice|answer(?:\s+is)?)\s*[:：]?\s*[(\[]?({letters})[)\]]?(?![a-z])",
        whole,
        re.IGNORECASE,
    )
    if stated:
        return str(stated[-1]).upper()
    correct = re.match(rf"[(\[]?({letters})[)\]]?\s+is\s+(?:the\s+)?(?:correct|right)", text)
    if correct:
        return correct.group(1)
    by_text = _choice_by_text(text, options)
    if by_text:
        return by_text
    if len(text.split()) <= 8:
        # A short answer naming one letter, ignoring letters it rules out ("not A; it is B").
        mentions = re.finditer(rf"(?<![A-Za-z])({letters})(?![A-Za-z])", text)
        kept = {m.group(1) for m in mentions if not re.search(r"\bnot\s*$", text[: m.start()])}
        if len(kept) == 1:
            return kept.pop()
    return None


def _choice_by_text(text: str, options: dict[str, str]) -> str | None:
    """An answer that quotes an option's text instead of its letter: the option it starts
    with (longest first), else the only option mentioned anywhere."""
    said = normalize(text)
    if not said:
        return None
    named = {letter: normalize(option) for letter, option in options.items() if normalize(option)}
    for letter, option in sorted(named.items(), key=lambda item: -len(item[1])):
        if said == option or said.startswith(option + " "):
            return letter
    mentioned = {letter for letter, option in named.items() if _has_phrase(said, option)}
    return mentioned.pop() if len(mentioned) == 1 else None


def _has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])", text) is not None


def score_choice(response: str | None, gold: str, options: dict[str, str]) -> Score:
    parsed = parse_choice(response, options)
    if parsed is None:
        return Score(correct=False, parsed=None, unparsed=True)
    return Score(correct=parsed == gold.strip().upper(), parsed=parsed)


# --------------------------------------------------------------------------------------------
# Yes / no


def parse_yes_no(response: str | None) -> str | None:
    """'yes' or 'no' as whole words: the first word if it is one, else the only one present."""
    words = re.findall(r"[a-z]+", extract_answer(response).lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return str(words[0])
    present = {w for w in words if w in ("yes", "no")}
    return present.pop() if len(present) == 1 else None


def score_yes_no(response: str | None, gold: str) -> Score:
    parsed = parse_yes_no(response)
    if parsed is None:
        return Score(correct=False, parsed=None, unparsed=True)
    return Score(correct=parsed == gold.strip().lower(), parsed=parsed)


# --------------------------------------------------------------------------------------------
# Closed and open answers


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answer_matches(said: str, gold: str) -> bool:
    """Normalized equality, equal numbers, or the gold phrase stated without a negation in the
    three words before it ("no pneumonia" does not match "pneumonia")."""
    said_n, gold_n = normalize(said), normalize(gold)
    if not gold_n:
        return False
    if said_n == gold_n:
        return True
    said_num, gold_num = _as_number(said.strip().rstrip(".")), _as_number(gold.strip())
    if said_num is not None and gold_num is not None:
        return math.isclose(said_num, gold_num, rel_tol=1e-9, abs_tol=1e-9)
    words, target = said_n.split(), gold_n.split()
    for start in range(len(words) - len(target) + 1):
        if words[start : start + len(target)] == target:
            before = set(words[max(0, start - 3) : start])
            if not before & NEGATIONS or set(target) & NEGATIONS:
                return True
    return False


def open_metrics(said: str, gold: str) -> dict[str, float]:
    """Token precision/recall/F1 (in that order), exact match, BLEU-1..4 and ROUGE-1/2/L;
    empty responses score 0."""
    pred, ref = _tokens(said), _tokens(gold)
    metrics = {"em": float(bool(pred) and pred == ref)}
    common = sum((Counter(pred) & Counter(ref)).values())
    precision = common / len(pred) if pred else 0.0
    recall = common / len(ref) if ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    metrics.update(precision=precision, recall=recall, f1=f1)
    for n in (1, 2, 3, 4):
        metrics[f"bleu{n}"] = sentence_bleu(ref, pred, n) if pred and ref else 0.0
    metrics.update(rouge_scores(pred, ref))
    return metrics


def _ngram_f(pred: Sequence[str], ref: Sequence[str], n: int) -> float:
    grams_p = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
    grams_r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
    overlap = sum((grams_p & grams_r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(grams_p.values()), overlap / sum(grams_r.values())
    return 2 * precision * recall / (precision + recall)


def _lcs_length(x: Sequence[str], y: Sequence[str]) -> int:
    previous = [0] * (len(y) + 1)
    for token in x:
        current = [0]
        for j, other in enumerate(y, 1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def rouge_scores(pred: Sequence[str], ref: Sequence[str]) -> dict[str, float]:
    if not pred or not ref:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougel": 0.0}
    lcs = _lcs_length(pred, ref)
    rouge_l = 2 * lcs / (len(pred) + len(ref))  # F of LCS precision and recall
    return {"rouge1": _ngram_f(pred, ref, 1), "rouge2": _ngram_f(pred, ref, 2), "rougel": rouge_l}


def score_closed(response: str | None, gold: str) -> Score:
    if gold.strip().lower() in ("yes", "no"):
        return score_yes_no(response, gold)
    said = extract_answer(response)
    if not normalize(said):
        return Score(correct=False, parsed=None, unparsed=True)
    return Score(correct=answer_matches(said, gold), parsed=normalize(said))


def score_open(response: str | None, gold: str) -> Score:
    said = extract_answer(response)
    metrics = open_metrics(said, gold)
    if not normalize(said):
        return Score(correct=False, parsed=None, unparsed=True, metrics=metrics)
    return Score(correct=answer_matches(said, gold), parsed=normalize(said), metrics=metrics)


def score_report(response: str | None, gold: str) -> Score:
    metrics = open_metrics(response or "", gold)
    return Score(correct=None, parsed=None, unparsed=not (response or "").strip(), metrics=metrics)


def score(kind: str, response: str | None, gold: str, options: dict[str, str]) -> Score:
    """Score one response by the benchmark's answer kind."""
    if kind == "choice":
        return score_choice(response, gold, options)
    if kind == "yes_no":
        return score_yes_no(response, gold)
    if kind == "closed":
        return score_closed(response, gold)
    if kind == "open":
        return score_open(response, gold)
    return score_report(response, gold)


# --------------------------------------------------------------------------------------------
# The judge (open questions only)


def judge_verdict(judge_output: str | None) -> bool | None:
    """True/False from the judge's ``<judge>0/1</judge>`` (the last tag wins), or a bare 0/1
    reply; None when the reply says neither (then the rule-based verdict stands)."""
    text = judge_output or ""
    tags = re.findall(r"<judge>\s*(.*?)\s*</judge>", text, re.DOTALL)
    value = str(tags[-1]).strip() if tags else text.strip()
    if value in ("0", "{0}"):
        return True
    if value in ("1", "{1}"):
        return False
    return None


def apply_judge(rule: Score, verdict: bool | None) -> Score:
    """The judge's verdict replaces the rule's for an open question; no verdict, no change."""
    if verdict is None:
        return rule
    return rule.model_copy(update={"correct": verdict})
