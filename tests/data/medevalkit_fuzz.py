"""A fuzzed corpus of model responses with MedEvalKit's verdict on each, kept as data.

    PYTHONPATH=. .venv/bin/python -m tests.data.medevalkit_fuzz   # rewrites the .jsonl beside it

``generate`` builds responses deterministically (a seeded RNG over answer templates: bare and
bracketed letters, option text, every answer marker MedEvalKit knows, ``\\boxed{}``, ``<answer>``
tags, blank-line blocks, the word "boxed", yes/no inside "normal"/"nodule"/"unknown", negations,
empty and punctuation-only answers, Chinese SLAKE answers, noise around all of them). The
expected verdicts are what ``suwen.evaluate.scoring_medevalkit`` says now; before the file is
written, every one is re-checked against ``reading``: MedEvalKit's rules as written in its
``utils/utils.py`` and each benchmark's ``cal_metrics``, restated here independently and
calling the very libraries MedEvalKit calls (nltk's ``sentence_bleu``, the ``rouge`` package,
mathruler's ``extract_boxed_content``). tests/test_eval_medevalkit_fuzz.py then holds the
compatible scorer to the recorded verdicts.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

from suwen.evaluate import scoring_medevalkit as mek

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "medevalkit_fuzz.jsonl"
SEED = 14
SIZE = 2400
METRICS = (
    "em",
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "rouge1",
    "rouge2",
    "rougel",
    "precision",
    "recall",
    "f1",
)

OPTION_TEXTS = [
    "Metformin",
    "Levofloxacin",
    "Lisinopril",
    "Warfarin",
    "Pulmonary embolism",
    "Aortic dissection",
    "yes",
    "no",
    "maybe",
    "Left lower lobe",
    "CT scan of the chest",
    "None of the above",
]
OPEN_GOLDS = [
    "left lung",
    "liver",
    "pneumonia",
    "right lower lobe",
    "axial",
    "t2 weighted",
    "brain",
    "cardiomegaly",
    "2",
    "mri",
    "small bowel obstruction",
    "kidney",
]
SLAKE_GOLDS = ["Liver", "Left Lung", "CT", "Yes", "No", "yes", "no", "肝", "左肺", "是", "否"]
NOISE = [
    "",
    "Based on the image, ",
    "Looking at the scan, ",
    "I think ",
    "Explanation: the findings suggest this.\n\n",
    "<think>Let me look at the image.</think>",
]
TAILS = [
    "",
    ".",
    "\n",
    " because of the findings.",
    "\n\nExplanation: typical appearance.",
    " (high confidence)",
]
MARKERS = [
    "The answer is ",
    "Answer: ",
    "answer:",
    "**Answer**: ",
    "**Answer:** ",
    "*Answer*: ",
    "**Answer** ",
    "Final answer: ",
    "The final answer is ",
    "答案:",
    "The correct option is: ",
]


def _wrap(rng: random.Random, core: str) -> str:
    """The answer put in one of the shapes models give it."""
    shape = rng.randrange(9)
    if shape == 0:
        return core
    if shape == 1:
        return rng.choice(MARKERS) + core + rng.choice(TAILS)
    if shape == 2:
        return f"\\boxed{{{core}}}"
    if shape == 3:
        return f"<answer>{core}</answer>"
    if shape == 4:
        return rng.choice(NOISE) + core + rng.choice(TAILS)
    if shape == 5:
        return core + "\n\n" + rng.choice(["Reasoning follows.", "I boxed it.", "Done"])
    if shape == 6:
        return rng.choice(["Reasoning.\n\n", "Step 1.\n\n"]) + core + rng.choice(TAILS)
    if shape == 7:
        return core.upper() if rng.random() < 0.5 else core.lower()
    return rng.choice(NOISE) + rng.choice(MARKERS) + core


def _choice_row(rng: random.Random, index: int) -> dict[str, Any]:
    count = rng.choice([3, 4, 5])
    texts = rng.sample(OPTION_TEXTS, count)
    letters = "ABCDE"[:count]
    sep = rng.choice([". ", ".", ": "])
    choices = [f"{letter}{sep}{text}" for letter, text in zip(letters, texts, strict=True)]
    gold = rng.choice(letters)
    pick = rng.choice(letters)
    text = texts[letters.index(pick)]
    core = rng.choice(
        [
            pick,
            pick.lower(),
            f"({pick})",
            f"{pick}.",
            f"{pick}. {text}",
            f"{pick}{sep}{text}",
            text,
            text.lower(),
            f"Option {pick}",
            f"not {rng.choice(letters)}; {pick}",
            rng.choice(["", " ", "none", "I am not sure", "all of them", "???"]),
            f"{pick}:",
        ]
    )
    return {
        "id": f"fz{index}",
        "family": "choice",
        "kind": "choice",
        "gold": gold,
        "choices": choices,
        "options": dict(zip(letters, texts, strict=True)),
        "extract_answer_tag": rng.random() < 0.8,
        "response": _wrap(rng, core),
    }


def _yes_no_row(rng: random.Random, index: int, family: str) -> dict[str, Any]:
    gold = rng.choice(["yes", "no", "Yes", "No"])
    core = rng.choice(
        [
            "yes",
            "no",
            "Yes",
            "No",
            "Yes, there is a nodule.",
            "No, it is normal.",
            "normal",
            "The heart is normal",
            "Not present",
            "unknown",
            "I do not know",
            "nondisplaced fracture",
            "None",
            "",
            ".",
            "yes and no",
            "There is no effusion",
            "Yes.",
        ]
    )
    return {
        "id": f"fz{index}",
        "family": family,
        "kind": "yes_no",
        "gold": gold,
        "choices": [],
        "options": {},
        "response": _wrap(rng, core),
    }


def _open_row(rng: random.Random, index: int, family: str) -> dict[str, Any]:
    gold = rng.choice(OPEN_GOLDS)
    other = rng.choice([g for g in OPEN_GOLDS if g != gold])
    core = rng.choice(
        [
            gold,
            gold.upper(),
            f"the {gold}",
            f"{gold}.",
            f"{gold} and {other}",
            f"{other}",
            f"no {gold}",
            f"It is {gold}. {other.capitalize()} is normal.",
            "",
            ".",
            "Answer:",
            "  ",
            f"{gold}\n{other}",
        ]
    )
    return {
        "id": f"fz{index}",
        "family": family,
        "kind": "open",
        "gold": gold,
        "choices": [],
        "options": {},
        "response": _wrap(rng, core),
    }


def _slake_row(rng: random.Random, index: int) -> dict[str, Any]:
    gold = rng.choice(SLAKE_GOLDS)
    kind = rng.choice(["closed", "open"])
    other = rng.choice([g for g in SLAKE_GOLDS if g != gold])
    core = rng.choice(
        [gold, gold.lower(), f"{gold}.", f"The {gold}", other, f"{gold}，{other}", "", "不是"]
    )
    return {
        "id": f"fz{index}",
        "family": "slake",
        "kind": kind,
        "gold": gold,
        "choices": [],
        "options": {},
        "response": _wrap(rng, core),
    }


def generate(size: int = SIZE, seed: int = SEED) -> list[dict[str, Any]]:
    """``size`` responses with their questions' gold answers, the same every time."""
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        family = rng.choice(["choice", "choice", "vqa", "pathvqa", "slake"])
        if family == "choice":
            rows.append(_choice_row(rng, index))
        elif family == "slake":
            rows.append(_slake_row(rng, index))
        elif rng.random() < 0.5:
            rows.append(_yes_no_row(rng, index, family))
        else:
            rows.append(_open_row(rng, index, family))
    return rows


def expected(row: dict[str, Any]) -> dict[str, Any]:
    """The compatible scorer's verdict (what the corpus records)."""
    verdict = mek.score_sample(
        row["family"],
        sample_id=row["id"],
        kind=row["kind"],
        gold=row["gold"],
        choices=row["choices"],
        options=row["options"],
        response=row["response"],
        extract_answer_tag=row.get("extract_answer_tag", True),
    )
    result: dict[str, Any] = {"correct": verdict.correct, "crash": verdict.crash is not None}
    if verdict.metrics:
        result["metrics"] = {key: round(verdict.metrics[key], 12) for key in METRICS}
    return result


# --------------------------------------------------------------------------------------------
# MedEvalKit's rules, restated from its source and run on the libraries it uses


def _tagged(text: str, tag: str) -> str:
    """``extract(text, tag)``: every tagged span, each followed by a space, joined and stripped;
    the text itself when there is none; "" for no text."""
    if not text:
        return ""
    spans = re.findall(f"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    joined = "".join(span + " " for span in spans).strip()
    return joined or text


def _cut_at_markers(text: str) -> str:
    """``parse_response``: lower case; boxed content if the word "boxed" appears, else the
    answer tag; then each known marker, in MedEvalKit's order, keeps what follows its last
    occurrence."""
    from mathruler.grader import extract_boxed_content

    text = text.lower()
    if "boxed" in text:
        text = extract_boxed_content(text)
    elif "<answer>" in text:
        text = _tagged(text, "answer")
    for marker in mek.ANSWER_MARKERS:
        if marker in text:
            text = text.split(marker)[-1]
    return text


def _multi_choice(choices: list[str], answer: str, response: str) -> bool:
    """``judge_multi_choice`` as its source reads."""
    import difflib

    letters = [chr(ord("a") + i) for i in range(len(choices))]
    text = response.lower()
    if text.split("\n\n")[0] in letters:
        text = text.split("\n\n")[0]
    elif text.split("\n\n")[-1].split(".")[0] in letters:
        text = text.split("\n\n")[-1].split(".")[0]
    text = _cut_at_markers(text).strip().lower().replace("\n", "")
    head = text.split(".")[0].split(":")[-1]
    lowered = [c.lower() for c in choices]
    answer = answer.strip().lower()
    if head == answer:
        return True
    if head in letters:
        return lowered[ord(head) - ord("a")] == answer
    if head in lowered:
        return answer in letters and head == lowered[ord(answer) - ord("a")]
    ratios = [difflib.SequenceMatcher(None, c, text).ratio() for c in lowered]
    best = 0
    for i, ratio in enumerate(ratios):
        if ratio > ratios[best]:
            best = i
    return letters[best] == answer or lowered[best] == answer


def _yes_no(answer: str, response: str) -> bool:
    text = _cut_at_markers(response).replace("\n", "").replace(".", "")
    return (("yes" in text) != ("no" in text)) and answer.lower() in text


def _closed(answer: str, response: str) -> bool:
    return _cut_at_markers(response).replace("\n", "").replace(".", "") == answer.lower()


def _open(answer: str, response: str) -> dict[str, Any]:
    import warnings

    from nltk.translate.bleu_score import sentence_bleu
    from rouge import Rouge

    answer = answer.lower()
    text = _cut_at_markers(response)

    def tokens(value: str) -> list[str]:
        return value.lower().replace(".", " .").split(" ")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = {
            f"bleu{n}": sentence_bleu([tokens(answer)], tokens(text), weights=[1 / n] * n)
            for n in (1, 2, 3, 4)
        }
    metrics["em"] = float(text == answer)
    try:
        scores = Rouge().get_scores(text.lower(), answer.lower())[0]
    except ValueError:
        return {"crash": True}
    metrics.update(
        rouge1=scores["rouge-1"]["f"], rouge2=scores["rouge-2"]["f"], rougel=scores["rouge-l"]["f"]
    )
    said, gold = set(text.lower().split()), set(answer.split())
    if not said or not gold:
        return {"crash": True}  # calculate_f1 returns 0, which the caller cannot unpack
    common = len(said & gold)
    precision, recall = common / len(said), common / len(gold)
    f1 = 2 * precision * recall / (precision + recall) if common else 0.0
    # The caller unpacks (f1, precision, recall) as (precision, recall, f1).
    metrics.update(precision=f1, recall=precision, f1=recall)
    return {"crash": False, "correct": bool(metrics["em"]), "metrics": metrics}


def reading(row: dict[str, Any]) -> dict[str, Any]:
    """MedEvalKit's verdict on ``row`` by this module's reading of its rules."""
    from mathruler.grader import extract_boxed_content

    response, gold = row["response"], row["gold"]
    if row["family"] == "choice":
        text = _tagged(response, "answer") if row.get("extract_answer_tag", True) else response
        return {"correct": _multi_choice(row["choices"], gold, text), "crash": False}
    slake = row["family"] == "slake"
    boxed = extract_boxed_content(response)
    if boxed != "None":
        response = boxed
    elif "<answer>" in response:
        response = _tagged(response, "answer")
    if not slake:  # VQA-RAD and PathVQA lower-case and strip both sides first
        gold, response = gold.lower().strip(), response.lower().strip()
    if row["kind"] == "open":
        return _open(gold, response)
    if not slake or gold in ("yes", "no"):
        return {"correct": _yes_no(gold, response), "crash": False}
    return {"correct": _closed(gold, response), "crash": False}


def agrees(recorded: dict[str, Any], read: dict[str, Any]) -> bool:
    if recorded["crash"] or read["crash"]:
        return bool(recorded["crash"]) == bool(read["crash"])
    if bool(recorded["correct"]) != bool(read["correct"]):
        return False
    ours, theirs = recorded.get("metrics"), read.get("metrics")
    if ours is None or theirs is None:
        return ours is None and theirs is None
    return all(math.isclose(ours[k], theirs[k], rel_tol=1e-9, abs_tol=1e-9) for k in METRICS)


def main() -> None:
    rows = generate()
    lines = []
    for row in rows:
        verdict = expected(row)
        read = reading(row)
        if not agrees(verdict, read):
            raise SystemExit(f"{row['id']}: compatible scorer {verdict} != reading {read}")
        lines.append(json.dumps({**row, "medevalkit": verdict}, ensure_ascii=False))
    tmp = CORPUS.with_suffix(".part")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(CORPUS)
    crashes = sum(json.loads(line)["medevalkit"]["crash"] for line in lines)
    print(f"{len(lines)} responses written to {CORPUS.name} ({crashes} MedEvalKit crashes)")


if __name__ == "__main__":
    main()
