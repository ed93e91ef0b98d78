"""Suwen's scorer: MedEvalKit's metrics without its bugs (the headline numbers).

Same answer markers, same metric families (option letter, yes/no, exact match for closed
questions, token overlap for open ones, the same judge prompt), but:

- yes/no is read from whole words, so "normal", "nodule" or "not" are not "no"; clear negative
  wording ("None seen.", "Not present.", "No evidence of ...") is "no";
- a multiple-choice answer that names no option is *unparsed*: wrong, and counted; a letter the
  response states explicitly ("the correct choice is C") beats option text it starts with;
- a closed or open answer is credited only when its *leading* answer states the gold phrase
  ("Right lung; the left lung is clear." is not "left"), singular and plural alike;
- precision, recall and F1 come back in that order, and empty responses score 0 instead of
  crashing;
- accuracy is divided once; the judge only ever rescoring open questions, so closed ones are
  neither counted twice nor dropped.

The token-overlap side metrics of open answers are Suwen's own (``suwen_*`` names, on
normalized words); the standard BLEU / ROUGE-L / METEOR / CIDEr live in ``text_metrics``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, Field

from suwen.evaluate import text_metrics

THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "Answer:", "**Final answer**:", "the answer is", "The correct answer would be" ...
MARKER = re.compile(
    r"(?:final\s+|correct\s+|best\s+)?answer\s*(?:\*\*)?\s*(?:is|would\s+be|:|：)\s*(?:\*\*)?",
    re.IGNORECASE,
)
NEGATIONS = frozenset(
    {"no", "not", "without", "absent", "neither", "nor", "never", "none"} | set("不无没未非否")
)
CJK = "\u4e00-\u9fff"
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
    """Lowercase words only: punctuation out, articles and extra spaces gone. Chinese
    characters are kept, one token each (SLAKE's Chinese answers)."""
    words = re.findall(rf"[a-z0-9]+(?:\.[0-9]+)?|[{CJK}]", text.lower())
    return " ".join(w for w in words if w not in ARTICLES)


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


# British spellings and irregular plurals a reader treats as the same word.
SPELLING = {
    "haemorrhage": "hemorrhage",
    "haematoma": "hematoma",
    "haemothorax": "hemothorax",
    "oedema": "edema",
    "oesophagus": "esophagus",
    "anaemia": "anemia",
    "ischaemia": "ischemia",
    "tumour": "tumor",
    "foetus": "fetus",
    "faeces": "feces",
    "paediatric": "pediatric",
}
IRREGULAR_PLURALS = {
    "vertebrae": "vertebra",
    "bronchi": "bronchus",
    "nuclei": "nucleus",
    "fungi": "fungus",
    "metastases": "metastasis",
    "diagnoses": "diagnosis",
    "apices": "apex",
    "cortices": "cortex",
    "appendices": "appendix",
    "calyces": "calyx",
    "pelves": "pelvis",
    "teeth": "tooth",
    "feet": "foot",
}
_KEEP_FINAL_S = ("ss", "us", "is", "as")


def base_form(word: str) -> str:
    """The word with plural and British-spelling variation removed ("lungs" -> "lung",
    "kidneys" -> "kidney", "masses" -> "mass", "vertebrae" -> "vertebra", "oedema" ->
    "edema"); other words unchanged."""
    word = SPELLING.get(word, word)
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    if word.endswith("ae"):
        return word[:-1]
    if word.endswith("s") and not word.endswith(_KEEP_FINAL_S):
        return word[:-1]
    return word


def _base_tokens(text: str) -> list[str]:
    return [base_form(word) for word in _tokens(text)]


# Where the leading answer ends: punctuation (not inside a number) or a word that starts a
# second thought ("The spleen, which lies next to the liver"; "Right lung but ...").
CLAUSE_BREAK = re.compile(
    r"(?<!\d)[.,]|[.,](?!\d)|[;!?\n:：，。；！？、]"
    r"|\b(?:which|but|whereas|although|though|while|however|unlike)\b",
    re.IGNORECASE,
)
# A clause that only sets the scene ("Based on the image, ...") is not the answer.
IMAGE_WORDS = r"(?:image|images|picture|scan|radiograph|x-?ray|ct|mri|film|study|figure|slice)"
PREAMBLE = re.compile(
    rf"^\s*(?:based on|according to|looking at|as (?:seen|shown)|(?:in|on|from) "
    rf"(?:this|the|these|given) {IMAGE_WORDS}|(?:yes|no|ok|okay|sure|well)\s*$)",
    re.IGNORECASE,
)


def clauses(text: str) -> list[str]:
    return [part for part in CLAUSE_BREAK.split(text) if normalize(part)]


def leading_answer(text: str, length: int = 1) -> str:
    """The first ``length`` clauses of a response that say something (scene-setting clauses
    such as "Based on the image" and a bare "Yes" skipped)."""
    parts = clauses(text)
    while len(parts) > length and PREAMBLE.match(parts[0]):
        parts = parts[1:]
    return " ".join(parts[:length])


# --------------------------------------------------------------------------------------------
# Multiple choice


def _letters_pattern(letters: Iterable[str]) -> str:
    return "[" + "".join(sorted(set(letters))) + "]"


def _stated_letter(text: str, letters: str) -> str | None:
    """The last letter a response states explicitly ("the correct choice is C", "option C",
    "I choose C"). A lower-case letter counts only when nothing follows it ("the answer is
    a bacterial infection" states no letter)."""
    pattern = re.compile(
        rf"(?:\b(?:option|choice|answer|letter)(?:\s+(?:is|would\s+be|should\s+be))?"
        rf"|\b(?:choose|select|pick|go\s+with))\s*[:：]?\s*(?:option\s+)?"
        rf"[(\[]?({letters})[)\]]?(?![A-Za-z])",
        re.IGNORECASE,
    )
    found = None
    for match in pattern.finditer(text):
        letter = match.group(1)
        after = text[match.end() :].lstrip(" )]")
        if letter.isupper() or not re.match(r"[A-Za-z]", after):
            found = letter.upper()
    return found


def parse_choice(response: str | None, options: dict[str, str]) -> str | None:
    """The option letter a response chose, or None when it names none (or several). A letter
    stated explicitly beats option text the response starts with."""
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
    stated = _stated_letter(whole, letters)
    if stated:
        return stated
    correct = re.search(rf"[(\[]?\b({letters})\b[)\]]?\s+is\s+(?:the\s+)?(?:correct|right)", text)
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

# A leading clause that clearly says "no" without the word: "None seen.", "Not present.",
# "Absent.", "There is no ...", "Negative."; hedges ("Not sure") are not answers.
NEGATIVE_LEAD = re.compile(
    r"^(?:none|not|absent|negative|nothing|neither|never|without|nor"
    r"|there\s+(?:is|are|was|were)\s+(?:no|not|none)"
    r"|(?:it|this|that|they)\s+(?:is|are|does|do)\s+not)\b",
    re.IGNORECASE,
)
HEDGE = re.compile(
    r"\b(?:sure|certain|clear|know|known|determin\w*|possible|able|enough|tell)\b",
    re.IGNORECASE,
)
CJK_YES = ("是", "对", "有", "存在")
CJK_NO = ("否", "不", "没", "无", "未")


def parse_yes_no(response: str | None) -> str | None:
    """'yes' or 'no': the first word if it is one, else the only one of the two present, else
    "no" for clearly negative wording; Chinese 是/有 and 否/不/没有 likewise."""
    text = extract_answer(response)
    stripped = text.strip()
    if stripped.startswith(CJK_NO):
        return "no"
    if stripped.startswith(CJK_YES):
        return "yes"
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return str(words[0])
    present = {w for w in words if w in ("yes", "no")}
    if len(present) == 1:
        return str(present.pop())
    lead = leading_answer(text)
    if NEGATIVE_LEAD.match(lead.strip()) and not HEDGE.search(lead):
        return "no"
    return None


def _yes_no_gold(gold: str) -> str | None:
    value = gold.strip().lower()
    if value in ("yes", "是"):
        return "yes"
    if value in ("no", "否"):
        return "no"
    return None


def score_yes_no(response: str | None, gold: str) -> Score:
    parsed = parse_yes_no(response)
    if parsed is None:
        return Score(correct=False, parsed=None, unparsed=True)
    return Score(correct=parsed == _yes_no_gold(gold), parsed=parsed)


# --------------------------------------------------------------------------------------------
# Closed and open answers


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answer_matches(said: str, gold: str) -> bool:
    """Whether the response's *leading* answer states the gold phrase: normalized equality,
    equal numbers, or the phrase (plural or singular) in the leading clause with no negation
    in the three words before it. "no pneumonia" is not "pneumonia"; "The spleen, which lies
    next to the liver." is not "liver"."""
    said_n, gold_n = normalize(said), normalize(gold)
    if not gold_n:
        return False
    if said_n == gold_n:
        return True
    said_num, gold_num = _as_number(said.strip().rstrip(".")), _as_number(gold.strip())
    if said_num is not None and gold_num is not None:
        return math.isclose(said_num, gold_num, rel_tol=1e-9, abs_tol=1e-9)
    lead = leading_answer(said, max(1, len(clauses(gold))))
    words, target = _base_tokens(lead), _base_tokens(gold)
    for start in range(len(words) - len(target) + 1):
        if words[start : start + len(target)] == target:
            before = set(words[max(0, start - 3) : start])
            if not before & NEGATIONS or set(target) & NEGATIONS:
                return True
    return False


def suwen_token_metrics(said: str, gold: str) -> dict[str, float]:
    """Suwen's own open-answer overlap: exact match and token precision/recall/F1 on
    normalized words (articles dropped, each word counted as often as it occurs); all 0
    for an empty answer. Not BLEU or ROUGE: those are in ``text_metrics``."""
    pred, ref = _tokens(said), _tokens(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    precision = common / len(pred) if pred else 0.0
    recall = common / len(ref) if ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "suwen_em": float(bool(pred) and pred == ref),
        "suwen_token_precision": precision,
        "suwen_token_recall": recall,
        "suwen_token_f1": f1,
    }


def open_metrics(said: str, gold: str) -> dict[str, float]:
    """Suwen's token overlap plus the standard sentence BLEU-1..4 (nltk) and ROUGE-L
    (rouge-score) of an open answer against its reference."""
    return {**suwen_token_metrics(said, gold), **text_metrics.sentence_metrics(said, gold)}


def score_closed(response: str | None, gold: str) -> Score:
    if _yes_no_gold(gold) is not None:
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
