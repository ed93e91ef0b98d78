"""The standard text-generation metrics, computed by the libraries that define them.

- BLEU-1..4: nltk's ``sentence_bleu`` (uniform weights, no smoothing), on MedEvalKit's report
  tokenization (lower case, "." split off, split on spaces), as its report script does.
- ROUGE-L: Google's ``rouge-score`` (the LCS F-measure of Lin, 2004), its own tokenizer.
- METEOR: METEOR 1.5 (Denkowski & Lavie), the jar and English paraphrase table that
  ``pycocoevalcap`` ships, run with the local ``java``. nltk's METEOR needs WordNet, which
  nltk downloads at run time and no PyPI package ships, so it is not used (docs/evaluation.md).
- CIDEr: ``pycocoevalcap``'s CIDEr over the whole set (its document frequencies come from the
  references scored together, so a subset's CIDEr is not the full set's).

A metric that cannot be computed here is returned as ``NotComputed`` with the reason, never as a
number.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence

from pydantic import BaseModel

BLEU_ORDERS = (1, 2, 3, 4)


class NotComputed(BaseModel):
    """A metric left out, and why (shown as such in the report)."""

    reason: str


def report_tokens(text: str) -> list[str]:
    """MedEvalKit's report tokenization (``prep_reports``): lower case, "." as its own token,
    split on single spaces, empty strings dropped."""
    return [token for token in text.lower().replace(".", " .").split(" ") if token]


def bleu(prediction: str, reference: str, n: int) -> float:
    """nltk's sentence BLEU-n (uniform weights, no smoothing); 0 for an empty prediction."""
    from nltk.translate.bleu_score import sentence_bleu

    hypothesis, references = report_tokens(prediction), [report_tokens(reference)]
    if not hypothesis or not references[0]:
        return 0.0
    with warnings.catch_warnings():
        # nltk warns (and returns ~0) when a higher-order n-gram has no match.
        warnings.simplefilter("ignore")
        return float(sentence_bleu(references, hypothesis, weights=(1.0 / n,) * n))


_ROUGE_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """rouge-score's ROUGE-L F-measure (0 when either side has no word it can tokenize)."""
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"])
    return float(_ROUGE_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def sentence_metrics(prediction: str, reference: str) -> dict[str, float]:
    """Per-answer BLEU-1..4 and ROUGE-L."""
    scores = {f"bleu{n}": bleu(prediction, reference, n) for n in BLEU_ORDERS}
    scores["rougeL"] = rouge_l(prediction, reference)
    return scores


def _one_line(text: str) -> str:
    # The METEOR jar reads one segment per line and uses '|||' as its field separator.
    return " ".join(text.replace("|||", " ").split())


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float | NotComputed:
    """Corpus METEOR 1.5 through pycocoevalcap's jar (needs ``java``)."""
    if not predictions:
        return NotComputed(reason="no reports to score")
    if shutil.which("java") is None:
        return NotComputed(reason="METEOR 1.5 runs on Java and no `java` is on PATH")
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ModuleNotFoundError:
        return NotComputed(reason="pycocoevalcap is not installed")
    gts = {str(i): [_one_line(" ".join(report_tokens(r))) or "."] for i, r in enumerate(references)}
    res = {
        str(i): [_one_line(" ".join(report_tokens(p))) or "."] for i, p in enumerate(predictions)
    }
    try:
        scorer = Meteor()
    except OSError as exc:
        return NotComputed(reason=f"cannot start METEOR's Java process: {exc}")
    try:
        score, _ = scorer.compute_score(gts, res)
    except (ValueError, OSError) as exc:  # the JVM died (out of memory, say): no number
        return NotComputed(reason=f"METEOR's Java process failed: {exc}")
    finally:
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score)


def cider(predictions: Sequence[str], references: Sequence[str]) -> float | NotComputed:
    """Corpus CIDEr (pycocoevalcap), one reference per report, MedEvalKit's tokenization."""
    if not predictions:
        return NotComputed(reason="no reports to score")
    from pycocoevalcap.cider.cider import Cider

    gts = {str(i): [" ".join(report_tokens(r))] for i, r in enumerate(references)}
    res = {str(i): [" ".join(report_tokens(p))] for i, p in enumerate(predictions)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# Model-based report scores MedEvalKit's report script computes (utils/Metrics_Compute/
# cal_report_metrics.py): each needs its package and model weights, which Suwen neither ships
# nor downloads. They are computed only when importable with their models already on disk
# (the hub stays offline), else reported as not computed, with why.
MODEL_BASED = {
    "RaTE": ("RaTEScore", "RaTEScore with its RaTE-NER-Deberta and BioLORD-2023-C models"),
    "GREEN": ("green_score", "green_score with the GREEN-radllama2-7b model"),
}


def _rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    from RaTEScore import RaTEScore  # type: ignore[import-not-found, unused-ignore]

    scores = RaTEScore().compute_score(list(predictions), list(references))
    return float(sum(scores) / len(scores))


def _green(predictions: Sequence[str], references: Sequence[str]) -> float:
    import tempfile

    from green_score import GREEN  # type: ignore[import-not-found, unused-ignore]

    with tempfile.TemporaryDirectory() as folder:
        scorer = GREEN("StanfordAIMI/GREEN-radllama2-7b", output_dir=folder)
        mean, *_ = scorer(list(references), list(predictions))
    return float(mean)


def model_based(
    predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float | NotComputed]:
    """RaTE and GREEN when their packages and (local) models are there, else why not. The
    hub stays offline while they load (a model not on disk fails, it is never fetched)."""
    import importlib.util

    from suwen.privacy import enforce

    enforce()
    computed: dict[str, float | NotComputed] = {}
    compute = {"RaTE": _rate, "GREEN": _green}
    for name, (package, needs) in MODEL_BASED.items():
        if importlib.util.find_spec(package) is None:
            computed[name] = NotComputed(reason=f"needs {needs}; not installed here")
            continue
        try:
            computed[name] = compute[name](predictions, references)
        except Exception as exc:  # a missing local model surfaces as the package's own error
            first_line = " ".join(str(exc).split())[:160] or type(exc).__name__
            computed[name] = NotComputed(reason=f"{needs} could not run offline: {first_line}")
    return computed
