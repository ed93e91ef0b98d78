"""MedEvalKit's scoring rules, re-implemented to behave exactly as its code does, bugs included.

This is the `medevalkit` number in Suwen's reports: the one that can stand beside Lingshu's
published table. Nothing here is MedEvalKit's code; each function names the MedEvalKit function
it mirrors (file and function in docs/evaluation.md). Suwen's own scorer (``scoring.py``) fixes
the bugs kept here on purpose:

- ``judge_judgement``: 'no' found as a substring ("not", "normal", "nodule", "know").
- ``judge_multi_choice``: an unparseable answer is mapped to the most similar option.
- ``judge_open_end_vqa``: precision/recall/F1 returned permuted; empty responses crash.
- ``aggregate``: open accuracy divided by the total twice; closed questions counted twice
  (SLAKE) or dropped (PathVQA) when the judge is on; a benchmark with no open or no closed
  question divides by zero.
"""

from __future__ import annotations

import difflib
import math
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, Field

Family = Literal["choice", "vqa", "slake", "pathvqa", "mmmu", "report"]

# Markers in parse_response's order: each one found cuts the response after its last occurrence.
ANSWER_MARKERS = (
    "**answer**:",
    "**answer**",
    "*answer*:",
    "**answer:**",
    "answer is",
    "answer:",
    "答案:",
    "final answer",
    "final answer is",
)


class MedEvalKitCrashError(Exception):
    """MedEvalKit raises here (an exception its code does not catch): no number comes out."""


class MekSample(BaseModel):
    """MedEvalKit's verdict on one response."""

    correct: bool | None = None
    parsed: str | None = None
    by_similarity: bool = Field(False, description="Unparsed choice mapped to the closest option")
    crash: str | None = Field(None, description="What MedEvalKit would raise on this sample")
    metrics: dict[str, float] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Text extraction (utils/utils.py, mathruler.grader)


def extract_boxed_content(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (braces balanced), else the string "None"."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return "None"
    content = text[start + len("\\boxed{") :]
    depth = 0
    for index, char in enumerate(content):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth == -1:
            return content[:index].strip()
    return "None"


def extract_tag(text: str | None, tag: str, hard: bool = True) -> str:
    """``extract``: every ``<tag>...</tag>`` joined by spaces; else the text itself (hard)."""
    if not text:
        return ""
    start_tag, end_tag = f"<{tag}>", f"</{tag}>"
    parts = []
    start = text.find(start_tag)
    while start != -1:
        end = text.find(end_tag, start + len(start_tag))
        if end == -1:
            break
        parts.append(text[start + len(start_tag) : end] + " ")
        start = text.find(start_tag, end + len(end_tag))
    found = "".join(parts).strip()
    if found:
        return found
    return text if hard else ""


def parse_response(response: str) -> str:
    response = response.lower()
    if "boxed" in response:
        # The word alone is enough: with no \boxed{...} this yields the string "None".
        response = extract_boxed_content(response)
    elif "<answer>" in response:
        response = extract_tag(response, "answer")
    for marker in ANSWER_MARKERS:
        if marker in response:
            response = response.split(marker)[-1]
    return response


# --------------------------------------------------------------------------------------------
# Multiple choice (utils/utils.py::judge_multi_choice)


def _most_similar_index(choices: Sequence[str], target: str) -> int:
    best_index, best = 0, 0.0
    for index, choice in enumerate(choices):
        ratio = difflib.SequenceMatcher(None, choice, target).ratio()
        if ratio > best:
            best_index, best = index, ratio
    return best_index


def judge_multi_choice(choices: Sequence[str], answer: str, response: str) -> MekSample:
    alphas = [chr(ord("a") + i) for i in range(len(choices))]
    response = response.lower()
    blocks = response.split("\n\n")
    if blocks[0] in alphas:
        response = blocks[0]
    elif blocks[-1].split(".")[0] in alphas:
        response = blocks[-1].split(".")[0]
    response = parse_response(response)
    lowered = [choice.lower() for choice in choices]
    response = response.strip().lower().replace("\n", "")
    split = response.split(".")[0].split(":")[-1]  # note: not stripped again
    answer = answer.strip().lower()

    def letter_of(text: str) -> str:
        if text in alphas:
            return text.upper()
        return alphas[lowered.index(text)].upper() if text in lowered else text

    if split == answer:
        return MekSample(correct=True, parsed=letter_of(split))
    if split in alphas:
        return MekSample(correct=lowered[ord(split) - ord("a")] == answer, parsed=split.upper())
    if split in lowered:
        correct = answer in alphas and split == lowered[ord(answer) - ord("a")]
        return MekSample(correct=correct, parsed=letter_of(split))
    index = _most_similar_index(lowered, response)
    correct = alphas[index] == answer or lowered[index] == answer
    return MekSample(correct=correct, parsed=alphas[index].upper(), by_similarity=True)


def score_choice(choices: Sequence[str], answer: str, response: str, *, extract: bool) -> MekSample:
    """A multiple-choice benchmark's ``cal_metrics`` step for one sample. All but PMC-VQA first
    take the ``<answer>`` tag's content (``extract``)."""
    text = extract_tag(response, "answer") if extract else response
    return judge_multi_choice(choices, answer, text)


# --------------------------------------------------------------------------------------------
# Yes/no and closed (utils/utils.py::judge_judgement, judge_close_end_vqa)


def judge_judgement(answer: str, response: str) -> MekSample:
    answer = answer.lower()
    text = parse_response(response).replace("\n", "").replace(".", "")
    has_yes, has_no = "yes" in text, "no" in text  # substrings: "not", "normal", "nodule"...
    parsed = "yes" if has_yes and not has_no else "no" if has_no and not has_yes else None
    correct = (has_yes != has_no) and answer in text
    return MekSample(correct=correct, parsed=parsed)


def judge_close_end_vqa(answer: str, response: str) -> MekSample:
    text = parse_response(response).replace("\n", "").replace(".", "")
    return MekSample(correct=text == answer.lower(), parsed=text)


# --------------------------------------------------------------------------------------------
# Open questions (utils/utils.py::judge_open_end_vqa, bleu, rouge, calculate_f1)


def _bleu_tokens(text: str) -> list[str]:
    return text.lower().replace(".", " .").split(" ")


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str], n: int) -> float:
    """NLTK's ``sentence_bleu`` with uniform weights and no smoothing (its method0)."""
    numerators, denominators = [], []
    for order in range(1, n + 1):
        counts = _ngrams(hypothesis, order)
        ref_counts = _ngrams(reference, order)
        numerators.append(sum(min(c, ref_counts[g]) for g, c in counts.items()))
        denominators.append(max(1, sum(counts.values())))
    if numerators[0] == 0:
        return 0.0
    hyp_len, ref_len = len(hypothesis), len(reference)
    if hyp_len > ref_len:
        brevity = 1.0
    elif hyp_len == 0:
        brevity = 0.0
    else:
        brevity = math.exp(1 - ref_len / hyp_len)
    # method0: a zero precision becomes the smallest float (NLTK warns and goes on).
    logs = [
        math.log(num / den) if num else math.log(sys.float_info.min)
        for num, den in zip(numerators, denominators, strict=True)
    ]
    return brevity * math.exp(math.fsum(log / n for log in logs))


def bleu(prediction: str, target: str, n: int) -> float:
    return sentence_bleu(_bleu_tokens(target), _bleu_tokens(prediction), n)


def _rouge_sentences(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(".") if len(part) > 0]


def _rouge_words(sentences: Iterable[str]) -> list[str]:
    return [word for sentence in sentences for word in sentence.split(" ")]


def _rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    if not hyp:
        raise MedEvalKitCrashError("ValueError: Hypothesis is empty.")
    if not ref:
        raise MedEvalKitCrashError("ValueError: Reference is empty.")
    hyp_grams = set(_ngrams(_rouge_words(hyp), n))
    ref_grams = set(_ngrams(_rouge_words(ref), n))
    overlap = len(hyp_grams & ref_grams)
    precision = overlap / len(hyp_grams) if hyp_grams else 0.0
    recall = overlap / len(ref_grams) if ref_grams else 0.0
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def _lcs_tokens(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """The tokens of one longest common subsequence, reconstructed as the rouge package does."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    tokens: set[str] = set()
    i, j = len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            tokens.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return tokens


def _rouge_l(hyp: list[str], ref: list[str]) -> float:
    if not hyp or not ref:
        raise MedEvalKitCrashError("ValueError: Collections must contain at least 1 sentence.")
    m = len(set(_rouge_words(ref)))
    n = len(set(_rouge_words(hyp)))
    union: set[str] = set()
    total = 0
    for ref_sentence in ref:
        before = len(union)
        for hyp_sentence in hyp:
            union |= _lcs_tokens(ref_sentence.split(" "), hyp_sentence.split(" "))
        total += len(union) - before
    recall, precision = total / m, total / n
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge(prediction: str, target: str) -> dict[str, float]:
    hyp, ref = _rouge_sentences(prediction.lower()), _rouge_sentences(target.lower())
    return {
        "rouge1": _rouge_n(hyp, ref, 1),
        "rouge2": _rouge_n(hyp, ref, 2),
        "rougel": _rouge_l(hyp, ref),
    }


def calculate_f1(prediction: str, truth: str) -> tuple[float, float, float]:
    """Returns (f1, precision, recall): the caller unpacks it as (precision, recall, f1)."""
    pred, gold = set(prediction.lower().split()), set(truth.lower().split())
    if not pred or not gold:
        # MedEvalKit returns a bare 0 here and the caller's tuple unpacking raises.
        raise MedEvalKitCrashError("TypeError: cannot unpack non-iterable int object")
    common = pred & gold
    precision, recall = len(common) / len(pred), len(common) / len(gold)
    if precision + recall == 0:
        return 0.0, 0.0, 0.0
    return 2 * precision * recall / (precision + recall), precision, recall


def judge_open_end_vqa(answer: str, response: str) -> dict[str, float]:
    """Open-question metrics as MedEvalKit reports them; raises where MedEvalKit raises."""
    answer = answer.lower()
    text = parse_response(response)
    scores: dict[str, float] = {f"bleu{n}": bleu(text, answer, n) for n in (1, 2, 3, 4)}
    scores["em"] = float(text == answer)
    scores.update(rouge(text, answer))
    precision, recall, f1 = calculate_f1(text, answer)  # permuted: f1, precision, recall
    scores.update(precision=precision, recall=recall, f1=f1)
    return scores


# --------------------------------------------------------------------------------------------
# Per-benchmark preprocessing and per-sample verdicts


def _vqa_preprocess(response: str, lower: bool) -> str:
    if extract_boxed_content(response) != "None":
        response = extract_boxed_content(response)
    elif "<answer>" in response:
        response = extract_tag(response, "answer")
    return response.lower().strip() if lower else response


def _open_verdict(answer: str, response: str) -> MekSample:
    try:
        metrics = judge_open_end_vqa(answer, response)
    except MedEvalKitCrashError as exc:
        return MekSample(correct=False, parsed=parse_response(response), crash=str(exc))
    return MekSample(correct=bool(metrics["em"]), parsed=parse_response(response), metrics=metrics)


def score_vqa(kind: str, gold: str, response: str, *, slake: bool = False) -> MekSample:
    """VQA-RAD / PathVQA (``slake=False``: response and answer lowercased, closed iff the answer
    is yes/no) or SLAKE (no lowercasing; closed by the dataset's answer type)."""
    text = _vqa_preprocess(response, lower=not slake)
    answer = gold if slake else gold.lower().strip()
    if kind == "open":
        return _open_verdict(answer, text)
    if not slake or answer in ("yes", "no"):
        return judge_judgement(answer, text)
    return judge_close_end_vqa(answer, text)


# MMMU (utils/MMMU/eval_utils.py)


def mmmu_parse_choice(response: str, options: dict[str, str], rng: random.Random) -> str:
    """``parse_multi_choice_response``: bracketed letter, bare letter, option text (in a long
    response), else a random letter; the last mention wins when several are found."""
    if "<answer>" in response:
        response = extract_tag(response, "answer")
    elif "\\boxed" in response:
        response = extract_boxed_content(response)
    response = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    letters = list(options)
    candidates = [c for c in letters if f"({c})" in response]
    bracketed, by_letter = bool(candidates), True
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c in letters if options[c].lower() in response.lower()]
        by_letter = not candidates
    if not candidates:
        return rng.choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if by_letter:
        marks = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    else:
        marks = [response.lower().rfind(options[c].lower()) for c in candidates]
    return candidates[marks.index(max(marks))]


def _mmmu_normalize(text: str) -> list[str | float]:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def score_mmmu(
    sample_id: str, kind: str, gold: str, options: dict[str, str], response: str, seed: int
) -> MekSample:
    if "<answer>" in response:
        response = extract_tag(response, "answer")
    if extract_boxed_content(response) != "None":
        response = extract_boxed_content(response)
    if kind == "choice":
        # MedEvalKit's random pick depends on the global RNG's history; here it is seeded per
        # sample so a re-scored run gives the same verdict.
        parsed = mmmu_parse_choice(response, options, random.Random(f"{seed}:{sample_id}"))
        return MekSample(correct=parsed == gold, parsed=parsed)
    # Open: MedEvalKit stores the raw response string as the "parsed prediction", so eval_open
    # compares the gold answer with each *character* of the response.
    golds = _mmmu_normalize(gold)
    correct = any(isinstance(g, str) and g in char for char in response for g in golds)
    return MekSample(correct=correct, parsed=response)


def score_sample(
    family: Family,
    *,
    sample_id: str,
    kind: str,
    gold: str,
    choices: Sequence[str],
    options: dict[str, str],
    response: str,
    extract_answer_tag: bool = True,
    seed: int = 0,
) -> MekSample:
    """MedEvalKit's verdict for one response of a benchmark of the given family."""
    if family == "choice":
        return score_choice(choices, gold, response, extract=extract_answer_tag)
    if family in ("vqa", "pathvqa"):
        return score_vqa(kind, gold, response)
    if family == "slake":
        return score_vqa(kind, gold, response, slake=True)
    if family == "mmmu":
        return score_mmmu(sample_id, kind, gold, options, response, seed)
    return MekSample()  # report generation: MedEvalKit leaves scoring to an external script


def judge_says_correct(judge_output: str | None) -> bool:
    """MedEvalKit's reading of the judge: the ``<judge>`` tag's content (or the whole reply
    when there is none) must be exactly "0"."""
    return extract_tag(judge_output, "judge") == "0"


def judged_by_medevalkit(family: Family, kind: str) -> bool:
    """Which samples MedEvalKit sends to the judge: open ones, or every one for SLAKE."""
    if family == "slake":
        return True
    return family in ("vqa", "pathvqa") and kind == "open"


# --------------------------------------------------------------------------------------------
# Benchmark accuracy (each dataset's cal_metrics)


class MekRecord(BaseModel):
    """What ``aggregate`` needs from one scored sample."""

    kind: str
    verdict: MekSample
    judge: bool | None = Field(None, description="MedEvalKit's reading of the judge's reply")


class MekMetrics(BaseModel):
    accuracy: float | None
    right: int | None = None
    total: int
    open_accuracy: float | None = None
    closed_accuracy: float | None = None
    open_metrics: dict[str, float] = Field(default_factory=dict)
    crash: str | None = None


def aggregate(family: Family, records: Sequence[MekRecord], judge_on: bool) -> MekMetrics:
    total = len(records)
    if family == "report":
        return MekMetrics(accuracy=None, total=total, crash=None)
    crashed = next((r.verdict.crash for r in records if r.verdict.crash), None)
    if crashed:
        return MekMetrics(accuracy=None, total=total, crash=crashed)
    if family in ("choice", "mmmu"):
        right = sum(bool(r.verdict.correct) for r in records)
        if total == 0:
            return MekMetrics(accuracy=None, total=0, crash="ZeroDivisionError: no samples")
        return MekMetrics(accuracy=right / total, right=right, total=total)
    return _aggregate_vqa(family, records, judge_on)


def _aggregate_vqa(family: Family, records: Sequence[MekRecord], judge_on: bool) -> MekMetrics:
    opened = [r for r in records if r.kind == "open"]
    closed = [r for r in records if r.kind != "open"]
    close_right = sum(bool(r.verdict.correct) for r in closed)
    open_right = sum(bool(r.verdict.correct) for r in opened)
    total_right = close_right + open_right
    if judge_on:
        judged = records if family == "slake" else opened
        judged_right = [r for r in judged if r.judge]
        if family == "pathvqa":  # everything reset, only open questions judged: closed dropped
            close_right = 0
            open_right = total_right = len(judged_right)
        else:  # VQA-RAD keeps rule-based closed; SLAKE adds the judged closed ones again
            total_right = close_right + len(judged_right)
            open_right = sum(r.kind == "open" for r in judged_right)
            close_right += sum(r.kind != "open" for r in judged_right)
    total = len(records)
    if not total or not opened or not closed:
        missing = "samples" if not total else "open questions" if not opened else "closed ones"
        return MekMetrics(accuracy=None, total=total, crash=f"ZeroDivisionError: no {missing}")
    sums: dict[str, float] = defaultdict(float)
    for record in opened:
        for name, value in record.verdict.metrics.items():
            sums[name] += value
    return MekMetrics(
        accuracy=total_right / total,
        right=total_right,
        total=total,
        # The 'acc' key is computed, then divided by the open total once more with the sums.
        open_accuracy=open_right / len(opened) / len(opened),
        closed_accuracy=close_right / len(closed),
        open_metrics={name: value / len(opened) for name, value in sums.items()},
    )
