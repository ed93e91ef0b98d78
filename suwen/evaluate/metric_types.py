"""The shape of metrics.json: what ``suwen.evaluate.report`` computes and every renderer reads.

TypedDicts rather than models: metrics.json is these dicts written as they are, so a key's
place and presence in the file is exactly where the code puts it. Keys of the ``total=False``
parts appear only when the run has what they describe.
"""

from __future__ import annotations

from typing import Any

# typing_extensions' TypedDict (a pydantic dependency): pydantic can check a metrics.json
# against these declarations only with it on Python 3.11 (tests/test_eval_report.py does).
from typing_extensions import TypedDict


class Accuracy(TypedDict):
    """Suwen's scorer over a set of questions (an abstention is neither right nor wrong)."""

    accuracy: float | None
    correct: int
    total: int
    abstained: int
    not_asked: int
    unparsed: int
    judge_unreadable: int


class MedEvalKitScore(TypedDict):
    """``scoring_medevalkit.MekMetrics`` as dumped: MedEvalKit's rules as they behave."""

    accuracy: float | None
    right: int | None
    total: int
    open_accuracy: float | None
    closed_accuracy: float | None
    open_metrics: dict[str, float]
    crash: str | None


class Paired(TypedDict):
    """``stats.PairedComparison`` as dumped: ``agent_*`` against ``plain_*`` on the same
    questions."""

    n: int
    plain_accuracy: float
    agent_accuracy: float
    delta: float
    ci95: tuple[float, float]
    mcnemar_p: float
    fixed: int
    broken: int


class CaseExampleEffect(Paired):
    """One case-example count (``examples``) against the first one listed (``baseline``)."""

    baseline: int
    examples: int


class ImageBaseline(TypedDict):
    """An answerer with the questions' own images against a blank or another question's."""

    n: int
    real_accuracy: float
    baseline_accuracy: float
    image_adds: float
    ci95: tuple[float, float]
    mcnemar_p: float
    share_without_image: float | None


class NotComputed(TypedDict):
    not_computed: str  # why there is no number


class ReportScores(TypedDict):
    """Report-generation metrics (fractions; None: nothing to average)."""

    n: int
    values: dict[str, float | NotComputed | None]


class Calibration(TypedDict):
    n: int
    ece: float | None
    brier: float | None
    aurc: float | None
    acc_at_coverage: dict[str, float]  # "0.80" -> accuracy of the most confident 80%


class ReliabilityRow(TypedDict):
    """One equal-width confidence bin of the reliability diagram."""

    low: float
    high: float
    count: int
    confidence: float
    accuracy: float


class RiskCoverage(TypedDict):
    coverage: list[float]
    risk: list[float]


class ConfidenceScores(Calibration):
    """How sure the answers were and what they cost, on held-out questions."""

    confidence_measured: int
    calibrated: int
    abstained: int
    retrieved_share: float | None  # adaptive mode: share of answers that ran the agent
    calls_per_question: float | None
    tokens_per_question: float | None
    reliability: list[ReliabilityRow]
    risk_coverage: RiskCoverage


class ModeExtras(TypedDict, total=False):
    report_metrics: ReportScores  # report-generation benchmarks only
    signals: dict[str, float | None]  # AUROC per signal, added once every mode is in


class ModeMetrics(ConfidenceScores, ModeExtras):
    """One benchmark answered in one mode run."""

    suwen: Accuracy
    medevalkit: MedEvalKitScore
    open_metrics: dict[str, float]
    latency_mean: float | None
    tokens_mean: dict[str, float]
    with_citations: int
    not_asked_reasons: dict[str, int]


class FlipExample(TypedDict):
    id: str
    question: str
    gold: str
    plain: str
    now: str
    changed: str | None


class FlipExamples(TypedDict):
    right_to_wrong: list[FlipExample]
    wrong_to_right: list[FlipExample]


class Flips(TypedDict):
    """Answers that changed between plain mode and another mode, with a few examples."""

    paired: int
    right_to_wrong: int
    wrong_to_right: int
    examples: FlipExamples


# grouping (kind, modality ...) -> its value -> mode run -> accuracy
ByType = dict[str, dict[str, dict[str, Accuracy]]]


class Comparisons(TypedDict, total=False):
    """Paired comparisons, present when the run has both sides of them."""

    paired: Paired  # ``vs_plain["agent"]``
    image_baselines: dict[str, dict[str, ImageBaseline]]  # answerer -> blank | shuffled
    case_examples: dict[str, dict[str, CaseExampleEffect]]  # mode -> "0->2"


class BenchmarkMetrics(Comparisons):
    expected: int
    finished: dict[str, int]  # mode run -> questions done
    modes: dict[str, ModeMetrics]
    by_type: ByType
    flips: dict[str, Flips]  # mode run -> against plain
    vs_plain: dict[str, Paired]  # each agent run against plain
    published_lingshu_7b: float | None


class RunInfo(TypedDict):
    """What the run was: model, modes, scoring options and provenance (from run.json)."""

    model: str
    modes: list[str]
    judge: bool
    leakage_guard: bool
    limit: int | None
    seed: int | None
    data: str | None
    lang: str | None
    sampling: dict[str, Any] | None
    images: dict[str, Any] | None
    max_tokens: int | None
    case_examples: list[int]
    provenance: dict[str, Any]


class Metrics(TypedDict):
    run: RunInfo
    published_source: str
    benchmarks: dict[str, BenchmarkMetrics]
