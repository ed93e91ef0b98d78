"""Scorers: each MedEvalKit bug reproduced by scoring_medevalkit and fixed by scoring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.scorer_agreement import DATA, measure
from suwen.evaluate import prompts
from suwen.evaluate import scoring as suwen
from suwen.evaluate import scoring_medevalkit as mek

MEDQA_OPTIONS = {"A": "Metformin", "B": "Levofloxacin", "C": "Lisinopril", "D": "Warfarin"}
MEDQA_CHOICES = [f"{k}. {v}" for k, v in MEDQA_OPTIONS.items()]


# -- bug: open-question precision / recall / F1 permuted ---------------------------------------


def test_open_precision_recall_f1_are_permuted_in_medevalkit_and_not_in_suwen() -> None:
    # "the left lung" vs gold "left lung": precision 2/3, recall 1, F1 0.8.
    theirs = mek.judge_open_end_vqa("left lung", "the left lung")
    assert theirs["precision"] == pytest.approx(0.8)  # the F1, reported as precision
    assert theirs["recall"] == pytest.approx(2 / 3)
    assert theirs["f1"] == pytest.approx(1.0)  # the recall, reported as F1
    # Suwen drops articles before counting tokens, so compare with an extra content word.
    ours = suwen.open_metrics("left lung base", "left lung")
    assert (
        ours["suwen_token_precision"],
        ours["suwen_token_recall"],
        ours["suwen_token_f1"],
    ) == pytest.approx((2 / 3, 1.0, 0.8))


# -- bug: empty responses crash F1 and ROUGE ---------------------------------------------------


@pytest.mark.parametrize("response", ["", "   ", ".", "Answer:"])
def test_empty_open_response_crashes_medevalkit_but_scores_zero_in_suwen(response: str) -> None:
    verdict = mek.score_vqa("open", "pneumonia", response)
    assert verdict.crash is not None
    aggregate = mek.aggregate("vqa", [mek.MekRecord(kind="open", verdict=verdict)], False)
    assert aggregate.accuracy is None and aggregate.crash
    ours = suwen.score("open", response, "pneumonia", {})
    assert ours.correct is False and ours.unparsed
    assert ours.metrics["suwen_token_f1"] == 0.0 and ours.metrics["rougeL"] == 0.0


# -- bug: open accuracy divided by the total twice ---------------------------------------------


def _rec(kind: str, correct: bool, judge: bool | None = None) -> mek.MekRecord:
    metrics = {"em": float(correct)} if kind == "open" else {}
    return mek.MekRecord(
        kind=kind, verdict=mek.MekSample(correct=correct, metrics=metrics), judge=judge
    )


def test_open_accuracy_is_divided_twice_by_medevalkit() -> None:
    records = [_rec("open", True), _rec("open", False), _rec("yes_no", True), _rec("yes_no", True)]
    theirs = mek.aggregate("vqa", records, judge_on=False)
    assert theirs.open_accuracy == pytest.approx(0.25)  # (1/2)/2
    assert theirs.accuracy == pytest.approx(0.75)
    open_right = [suwen.score("open", r, "pneumonia", {}) for r in ("pneumonia", "edema")]
    assert sum(bool(s.correct) for s in open_right) / len(open_right) == 0.5


# -- bug: closed questions counted twice (SLAKE) or dropped (PathVQA) with the judge -----------


def test_judge_double_counts_slake_closed_and_drops_pathvqa_closed() -> None:
    # Two closed questions right by rule, two open ones; the judge says every answer is right.
    records = [
        _rec("closed", True, judge=True),
        _rec("closed", True, judge=True),
        _rec("open", False, judge=True),
        _rec("open", False, judge=True),
    ]
    slake = mek.aggregate("slake", records, judge_on=True)
    assert slake.right == 6 and slake.accuracy == pytest.approx(1.5)  # more right than asked
    path_records = [
        _rec("yes_no", True),
        _rec("yes_no", True),
        _rec("open", False, judge=True),
        _rec("open", False, judge=False),
    ]
    path = mek.aggregate("pathvqa", path_records, judge_on=True)
    assert path.accuracy == pytest.approx(0.25)  # the two right closed answers vanished
    vqa_rad = mek.aggregate("vqa", path_records, judge_on=True)
    assert vqa_rad.accuracy == pytest.approx(0.75)  # VQA-RAD's own code gets this one right
    # Suwen: the judge only rescoring open answers, closed ones keep their rule verdict.
    closed = suwen.score("yes_no", "Yes", "yes", {})
    judged_open = suwen.apply_judge(suwen.score("open", "edema", "pneumonia", {}), True)
    assert closed.correct and judged_open.correct


# -- bug: "not", "normal", "nodule" read as "no" -----------------------------------------------


@pytest.mark.parametrize(
    ("response", "gold", "human"),
    [
        ("The heart size is normal.", "no", False),
        ("Yes, there is a nodule in the left lung.", "yes", True),
        ("I do not know.", "no", False),
        ("Yes, there is a nondisplaced fracture.", "yes", True),
        ("Unknown", "no", False),
    ],
)
def test_yes_no_substrings_fool_medevalkit_not_suwen(response: str, gold: str, human: bool) -> None:
    assert mek.judge_judgement(gold, response).correct is not human
    assert suwen.score("yes_no", response, gold, {}).correct is human


def test_yes_no_whole_words() -> None:
    assert suwen.parse_yes_no("No. There is no effusion") == "no"
    assert suwen.parse_yes_no("Yes, no doubt") == "yes"  # the first word answers
    assert suwen.parse_yes_no("\\boxed{yes}") == "yes"
    assert suwen.parse_yes_no("maybe") is None


# -- bug: an unparseable multiple-choice answer mapped to the most similar option --------------


@pytest.mark.parametrize(
    "response", ["", "I'm not sure; it could be A or C.", "None of the options is appropriate."]
)
def test_unparsed_choice_is_guessed_by_medevalkit_and_counted_by_suwen(response: str) -> None:
    theirs = mek.score_choice(MEDQA_CHOICES, "A", response, extract=True)
    assert theirs.by_similarity  # MedEvalKit picked an option for it
    ours = suwen.score("choice", response, "A", MEDQA_OPTIONS)
    assert ours.unparsed and ours.correct is False and ours.parsed is None


def test_empty_choice_answer_is_option_a_for_medevalkit() -> None:
    assert mek.score_choice(MEDQA_CHOICES, "A", "", extract=True).correct is True
    assert suwen.score("choice", "", "A", MEDQA_OPTIONS).correct is False


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("The answer is B.", "B"),
        ("Answer: B", "B"),
        ("**Answer:** B", "B"),
        ("\\boxed{B}", "B"),
        ("<answer>B</answer>", "B"),
        ("B. Levofloxacin", "B"),
        ("B) Levofloxacin", "B"),
        ("Levofloxacin", "B"),
        ("Option B is correct because it covers atypicals.", "B"),
        ("The answer is not A; it is B.", "B"),
        ("Answer: B\n\nExplanation: A is for diabetes and D is an anticoagulant.", "B"),
        ("<think>A? no, C? no.</think>The answer is D", "D"),
        ("A 62-year-old man needs levofloxacin.", "B"),
    ],
)
def test_suwen_reads_the_letter(response: str, letter: str) -> None:
    assert suwen.parse_choice(response, MEDQA_OPTIONS) == letter


def test_pubmedqa_option_words() -> None:
    options = {"A": "yes", "B": "no", "C": "maybe"}
    assert suwen.parse_choice("No.", options) == "B"
    assert suwen.parse_choice("Maybe, the evidence is mixed.", options) == "C"
    assert suwen.parse_choice("There is no yes or no answer", options) is None


# -- other MedEvalKit behaviour kept faithfully ------------------------------------------------


def test_medevalkit_answer_markers_and_boxed_word() -> None:
    assert mek.parse_response("Final answer: B") == " b"
    assert mek.parse_response("**Answer**: C") == " c"
    assert mek.parse_response("The answer is B; answer: C") == " c"  # each marker cuts again
    # The word "boxed" without \boxed{} turns the whole response into "None".
    assert mek.parse_response("I boxed it: yes") == "None"
    assert mek.extract_boxed_content("x \\boxed{a{b}c} y") == "a{b}c"
    assert mek.extract_tag("<judge>0</judge>", "judge") == "0"
    assert mek.judge_says_correct("<think>same</think><judge>0</judge>")
    assert mek.judge_says_correct("<judge> 0 </judge>")  # extract strips the tag's content


def test_mmmu_open_answers_are_compared_character_by_character() -> None:
    verdict = mek.score_mmmu("q1", "closed", "12.5", {}, "12.5", seed=0)
    assert verdict.correct is False  # MedEvalKit's MMMU never credits an open answer
    assert suwen.score("closed", "12.5", "12.5", {}).correct


def test_mmmu_choice_falls_back_to_a_seeded_random_letter() -> None:
    options = {"A": "x", "B": "y", "C": "z"}
    first = mek.score_mmmu("q1", "choice", "A", options, "no idea", seed=3)
    again = mek.score_mmmu("q1", "choice", "A", options, "no idea", seed=3)
    assert first.parsed == again.parsed and first.parsed in options
    assert mek.score_mmmu("q1", "choice", "B", options, "(B)", seed=0).correct


def test_bleu_and_rouge_reimplementations() -> None:
    assert mek.bleu("left lung", "left lung", 1) == pytest.approx(1.0)
    assert mek.bleu("right kidney", "left lung", 1) == 0.0
    # Two-token hypothesis: no 3-grams, so BLEU-3 collapses to ~0 (NLTK's method0).
    assert mek.bleu("left lung", "left lung", 3) < 1e-60
    scores = mek.rouge("the left lung", "left lung")
    assert scores["rouge1"] == pytest.approx(0.8, abs=1e-6)
    assert scores["rougel"] == pytest.approx(0.8, abs=1e-6)


def test_closed_and_open_matching() -> None:
    assert suwen.score("closed", "The left lung", "Left", {}).correct
    assert suwen.score("closed", "Liver.", "Liver", {}).correct
    assert not suwen.score("closed", "Abdomen", "Chest", {}).correct
    assert not suwen.score("open", "No pneumonia is seen.", "pneumonia", {}).correct
    assert suwen.score("open", "Right lower lobe.", "right lower lobe", {}).correct
    assert not suwen.score("open", "kidney", "left kidney", {}).correct
    assert suwen.score("closed", "1,000", "1000", {}).correct


def test_judge_readings() -> None:
    assert suwen.judge_verdict("<think>ok</think>\n<judge>0</judge>") is True
    assert suwen.judge_verdict("<judge>1</judge>") is False
    assert suwen.judge_verdict("1") is False
    assert suwen.judge_verdict("I think it is right") is None
    assert mek.judge_says_correct("I think it is right") is False
    rule = suwen.score("open", "edema", "pneumonia", {})
    assert suwen.apply_judge(rule, None) == rule


def test_judge_prompt_is_medevalkits() -> None:
    text = prompts.judge_prompt("Q?", "resp", "gold")
    assert "The standard answer: gold" in text and "The user's answer: resp" in text
    assert "<think>{your concise think step}</think>" in text
    assert text.rstrip().endswith("<judge>0</judge>")


# -- the hand-labelled set ---------------------------------------------------------------------


def test_agreement_with_the_human_verdicts() -> None:
    result = measure(Path(DATA))
    assert result["n"] >= 50
    medevalkit, ours = result["agreement"]["medevalkit"], result["agreement"]["suwen"]
    assert ours >= 0.95, result["disagreements"]["suwen"]
    assert medevalkit < ours
    assert math.isclose(sum(k["suwen"] for k in result["by_kind"].values()) / result["n"], ours)


# -- Suwen's rules on realistic Lingshu-style responses ----------------------------------------


@pytest.mark.parametrize(
    ("response", "gold", "right"),
    [
        # The leading answer decides; the gold phrase named as the alternative is no credit.
        ("Right lung; the left lung is clear.", "left", False),
        ("The spleen, which lies next to the liver.", "liver", False),
        ("Right kidney, but the left kidney also shows a small cyst.", "left kidney", False),
        ("Axial CT, not the coronal plane.", "coronal", False),
        # ... while the leading answer stating it is credit, preamble or not.
        ("The left lung.", "left", True),
        ("Based on the image, the left lung is affected.", "left", True),
        ("In this CT image, the liver shows a hypodense lesion.", "liver", True),
        ("Liver, with a lesion near the spleen.", "liver", True),
        # Singular and plural, British spelling.
        ("Lungs", "lung", True),
        ("Both kidneys.", "kidneys", True),
        ("The kidney", "kidneys", True),
        ("Ribs", "rib", True),
        ("Masses in both lobes", "mass", True),
        ("Vertebrae", "vertebra", True),
        ("Oedema", "edema", True),
        # Negated mention is still no credit; a different organ is still wrong.
        ("No pneumothorax is seen.", "pneumothorax", False),
        ("Heart", "lung", False),
    ],
)
def test_leading_answer_and_morphology(response: str, gold: str, right: bool) -> None:
    assert suwen.score("closed", response, gold, {}).correct is right
    assert suwen.score("open", response, gold, {}).correct is right


@pytest.mark.parametrize(
    ("response", "parsed"),
    [
        ("None seen.", "no"),
        ("Not present.", "no"),
        ("No evidence of pneumothorax.", "no"),
        ("Absent.", "no"),
        ("There is no pleural effusion.", "no"),
        ("Negative for fracture.", "no"),
        ("It is not enlarged.", "no"),
        ("Yes, there is cardiomegaly.", "yes"),
        # Hedges and descriptions are not answers.
        ("Not sure.", None),
        ("It is not possible to tell from this image.", None),
        ("The heart size is normal.", None),
        # SLAKE's Chinese closed answers.
        ("是", "yes"),
        ("否", "no"),
        ("没有", "no"),
    ],
)
def test_negative_wording_is_no(response: str, parsed: str | None) -> None:
    assert suwen.parse_yes_no(response) == parsed


def test_chinese_yes_no_gold_is_scored_as_yes_no() -> None:
    assert suwen.score("closed", "否", "否", {}).correct
    assert suwen.score("closed", "没有。", "否", {}).correct
    assert not suwen.score("closed", "是", "否", {}).correct
    assert suwen.score("closed", "左肺", "左肺", {}).correct
    assert not suwen.score("open", "没有肿瘤", "肿瘤", {}).correct


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("Levofloxacin. The correct choice is C.", "C"),
        ("Levofloxacin is tempting, but the correct option is C.", "C"),
        ("Levofloxacin would cover it; still, I choose C.", "C"),
        ("Lisinopril (C) is correct.", "C"),
        ("Levofloxacin covers atypical organisms.", "B"),
        # A lower-case article is not a stated letter.
        ("The answer is a fluoroquinolone: levofloxacin.", "B"),
    ],
)
def test_an_explicit_letter_beats_leading_option_text(response: str, letter: str) -> None:
    assert suwen.parse_choice(response, MEDQA_OPTIONS) == letter


# -- the standard metrics come from their libraries --------------------------------------------


def test_standard_sentence_metrics_are_the_libraries_own() -> None:
    from nltk.translate.bleu_score import sentence_bleu
    from rouge_score import rouge_scorer

    from suwen.evaluate import text_metrics

    pred = "The heart is normal in size. The lungs are clear."
    ref = "Findings: The heart size is normal. The lungs are clear. Impression: Normal chest."
    hyp, refs = text_metrics.report_tokens(pred), [text_metrics.report_tokens(ref)]
    assert "." in hyp and "heart" in hyp and "The" not in hyp
    ours = text_metrics.sentence_metrics(pred, ref)
    assert ours["bleu1"] == pytest.approx(sentence_bleu(refs, hyp, weights=(1.0,)))
    assert ours["bleu4"] == pytest.approx(sentence_bleu(refs, hyp, weights=(0.25,) * 4))
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert ours["rougeL"] == pytest.approx(expected)
    assert text_metrics.sentence_metrics("", ref)["bleu1"] == 0.0


def test_cider_rewards_the_matching_report() -> None:
    from suwen.evaluate import text_metrics

    refs = ["The lungs are clear. No effusion.", "Right lower lobe pneumonia.", "Cardiomegaly."]
    good = text_metrics.cider(refs, refs)
    shuffled = text_metrics.cider(refs[1:] + refs[:1], refs)
    assert isinstance(good, float) and isinstance(shuffled, float)
    assert good > 1.0 > shuffled


@pytest.mark.slow
def test_meteor_runs_offline_on_the_shipped_jar() -> None:
    from suwen.evaluate import text_metrics

    refs = ["the heart is normal in size . the lungs are clear .", "there is a small effusion ."]
    same = text_metrics.meteor(refs, refs)  # one JVM start (~10 s): the paraphrase table
    assert isinstance(same, float) and same > 0.9


def test_meteor_without_java_is_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    from suwen.evaluate import text_metrics

    monkeypatch.setattr(text_metrics.shutil, "which", lambda name: None)
    result = text_metrics.meteor(["a"], ["a"])
    assert isinstance(result, text_metrics.NotComputed) and "java" in result.reason


def test_meteor_whose_jvm_dies_is_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from pycocoevalcap.meteor import meteor as jar

    from suwen.evaluate import text_metrics

    class DeadJar:
        def __init__(self) -> None:
            self.meteor_p = subprocess.Popen(["true"])

        def compute_score(self, gts: object, res: object) -> tuple[float, list[float]]:
            raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr(jar, "Meteor", DeadJar)
    result = text_metrics.meteor(["a report ."], ["a report ."])
    assert isinstance(result, text_metrics.NotComputed) and "failed" in result.reason
