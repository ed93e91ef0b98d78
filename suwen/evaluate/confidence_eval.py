"""Confidence in the evaluation: what each sample record keeps, and what the report computes.

Per record: the confidence (calibrated when the calibration file has a map for the benchmark,
or its answer form, and mode), its raw value and source, whether the answer was withheld
(``abstained``: below ``--abstain-below``, scored neither right nor wrong) and adaptive mode's
route. Per benchmark and mode: ECE, Brier, AURC and accuracy at 80/90/95% coverage on the
held-out questions (a calibrated record in the dev split is left out: its map was fitted on
it), model calls and tokens per question, the share that retrieved (adaptive), abstentions;
and answers flipped right-to-wrong and wrong-to-right against plain mode, with examples.

Plain mode's confidence is probed on MedEvalKit's prompt and the model's reply (the same
probe the agent's assess step makes); the agent and adaptive modes carry their result's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from suwen.agent.answers import short_answer_of
from suwen.agent.confidence import answer_confidence
from suwen.evaluate.calibration import (
    CalibrationFile,
    ReliabilityBin,
    calibration_metrics,
    is_dev,
    reliability,
    risk_coverage,
)
from suwen.evaluate.metric_types import (
    ConfidenceScores,
    FlipExample,
    Flips,
    Metrics,
    ReliabilityRow,
)
from suwen.llm.base import Message, VisionLanguageModel
from suwen.types import AgentResult, Route

if TYPE_CHECKING:
    from suwen.evaluate.benchmarks import Sample
    from suwen.evaluate.runner import SampleRecord

FLIP_EXAMPLES = 3
FLIP_LABELS = (("right_to_wrong", "right→wrong"), ("wrong_to_right", "wrong→right"))
CURVE_POINTS = 200  # risk-coverage points kept in metrics.json
EXAMPLE_CHARS = 160


class AnswerJudgement(BaseModel):
    """The confidence fields a sample record keeps."""

    confidence: float | None = None
    confidence_raw: float | None = None
    confidence_source: str = "none"
    calibrated: bool = False
    abstained: bool = False
    route: Route | None = None
    # Other signals measured against correctness in the report (agent answers only).
    cited_relevance: float | None = Field(None, description="Mean reread score of cited items")
    all_claims_cited: bool | None = None


def judgement_of(result: AgentResult) -> AnswerJudgement:
    relevance = {item.key: item.relevance for item in result.evidence}
    cited = [relevance[c.key] for c in result.citations if c.key in relevance]
    searched = bool(result.evidence) or bool(result.citations)
    return AnswerJudgement(
        confidence=result.confidence,
        confidence_raw=result.confidence_raw,
        confidence_source=result.confidence_source,
        calibrated=result.calibrated,
        abstained=result.abstained,
        route=result.route,
        cited_relevance=sum(cited) / len(cited) if cited else None,
        all_claims_cited=result.supported if searched else None,
    )


def plain_confidence_judge(
    model: VisionLanguageModel,
    calibration: CalibrationFile | None,
    abstain_below: float | None,
) -> Callable[[Sample, list[Message], str], Awaitable[AnswerJudgement]]:
    """Plain mode's confidence: the probe on MedEvalKit's prompt and the model's reply."""

    async def judge(sample: Sample, messages: list[Message], reply: str) -> AnswerJudgement:
        answer_format = sample.to_question().answer_format
        _, short = short_answer_of(reply, answer_format)
        measured = await answer_confidence(
            model,
            messages=messages,
            reply=reply,
            short=short,
            answer_format=answer_format,
            question=sample.question,
            images=[image for message in messages for image in message.images],
            answer=reply,
        )
        raw = measured.value
        families = [sample.benchmark, answer_format.kind]
        fitted = calibration.find(families, "plain") if calibration and raw is not None else None
        value = fitted.apply(raw) if fitted is not None and raw is not None else raw
        return AnswerJudgement(
            confidence=value,
            confidence_raw=raw,
            confidence_source=measured.source,
            calibrated=fitted is not None,
            abstained=abstain_below is not None and value is not None and value < abstain_below,
        )

    return judge


# -- report -----------------------------------------------------------------------------------


def held_out(benchmark: str, records: Sequence[SampleRecord]) -> list[SampleRecord]:
    """Records whose confidence says something about unseen questions: a calibrated record in
    the dev split was part of what its map was fitted on."""
    return [r for r in records if not (r.calibrated and is_dev(benchmark, r.id))]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def confidence_metrics(benchmark: str, records: Sequence[SampleRecord]) -> ConfidenceScores:
    """The stable keys of metrics.json for one benchmark and mode."""
    scored = [
        r
        for r in held_out(benchmark, records)
        if r.confidence is not None and r.correct is not None
    ]
    confidence = [float(r.confidence) for r in scored if r.confidence is not None]
    correct = [bool(r.correct) for r in scored]
    calibration = calibration_metrics(confidence, correct)
    coverage, risk = risk_coverage(confidence, correct) if scored else ([], [])
    step = max(1, len(coverage) // CURVE_POINTS)
    routed = [r for r in records if r.route is not None]
    return {
        **calibration,
        "confidence_measured": len(scored),
        "calibrated": sum(r.calibrated for r in scored),
        "abstained": sum(r.abstained for r in records),
        "retrieved_share": (
            sum(r.route.path == "agent" for r in routed if r.route) / len(routed)
            if routed
            else None
        ),
        "calls_per_question": _mean([float(r.model_calls) for r in records]),
        "tokens_per_question": _mean([float(sum(r.tokens.values())) for r in records]),
        "reliability": [_bin(b) for b in reliability(confidence, correct)] if scored else [],
        "risk_coverage": {"coverage": coverage[::step], "risk": risk[::step]},
    }


def _bin(found: ReliabilityBin) -> ReliabilityRow:
    return {
        "low": found.low,
        "high": found.high,
        "count": found.count,
        "confidence": found.confidence,
        "accuracy": found.accuracy,
    }


def auroc(scores: Sequence[float], right: Sequence[bool]) -> float | None:
    """How well a signal ranks right answers above wrong ones (0.5 = chance), or None when
    there is nothing to rank (no scores, or only one outcome)."""
    if len(set(right)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([int(r) for r in right], list(scores)))


def signal_aurocs(
    records: Sequence[SampleRecord], plain: Sequence[SampleRecord] | None
) -> dict[str, float | None]:
    """AUROC for correctness of each signal Suwen could weigh an answer by: its confidence,
    the reread relevance of what it cites, whether every claim is cited, and (against plain
    mode's answer to the same question) whether plain and this mode agree."""
    scored = [r for r in records if r.correct is not None]
    signals: dict[str, list[tuple[float, bool]]] = {
        "confidence": [(r.confidence, bool(r.correct)) for r in scored if r.confidence is not None],
        "cited_relevance": [
            (r.cited_relevance, bool(r.correct)) for r in scored if r.cited_relevance is not None
        ],
        "all_claims_cited": [
            (float(r.all_claims_cited), bool(r.correct))
            for r in scored
            if r.all_claims_cited is not None
        ],
    }
    if plain is not None:
        before = {r.id: r for r in plain if r.parsed is not None}
        signals["agrees_with_plain"] = [
            (float(before[r.id].parsed == r.parsed), bool(r.correct))
            for r in scored
            if r.id in before and r.parsed is not None
        ]
    return {
        name: auroc([score for score, _ in pairs], [right for _, right in pairs])
        for name, pairs in signals.items()
    }


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 1] + "…"


def flips(
    plain: Sequence[SampleRecord], other: Sequence[SampleRecord], order: Sequence[str]
) -> Flips:
    """Answers right in plain mode and wrong in ``other``, and the reverse (abstentions and
    unscored answers are left out), with a few examples of each."""
    before = {r.id: r for r in plain if r.correct is not None and not r.abstained}
    after = {r.id: r for r in other if r.correct is not None and not r.abstained}
    paired = [i for i in order if i in before and i in after]
    right_to_wrong = [i for i in paired if before[i].correct and not after[i].correct]
    wrong_to_right = [i for i in paired if not before[i].correct and after[i].correct]

    def example(sample_id: str) -> FlipExample:
        was, now = before[sample_id], after[sample_id]
        return {
            "id": sample_id,
            "question": _clip(was.question),
            "gold": was.gold,
            "plain": _clip(was.parsed or was.response),
            "now": _clip(now.parsed or now.response),
            "changed": now.route.changed if now.route else None,
        }

    return {
        "paired": len(paired),
        "right_to_wrong": len(right_to_wrong),
        "wrong_to_right": len(wrong_to_right),
        "examples": {
            "right_to_wrong": [example(i) for i in right_to_wrong[:FLIP_EXAMPLES]],
            "wrong_to_right": [example(i) for i in wrong_to_right[:FLIP_EXAMPLES]],
        },
    }


def flips_by_mode(by_mode: dict[str, list[SampleRecord]], order: Sequence[str]) -> dict[str, Flips]:
    if "plain" not in by_mode:
        return {}
    return {
        mode: flips(by_mode["plain"], records, order)
        for mode, records in by_mode.items()
        if mode != "plain"
    }


def _fmt(value: object, digits: int = 3) -> str:
    return (
        "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    )


CONFIDENCE_HEADERS = (
    "Benchmark",
    "mode",
    "accuracy",
    "n (conf.)",
    "ECE",
    "Brier",
    "AURC",
    "acc@80%",
    "acc@90%",
    "acc@95%",
    "right→wrong",
    "wrong→right",
    "retrieved",
    "calls/q",
    "tokens/q",
    "abstained",
)


def confidence_rows(metrics: Metrics) -> list[list[str]]:
    rows = []
    for name, entry in metrics["benchmarks"].items():
        for mode, m in entry["modes"].items():
            at = m.get("acc_at_coverage") or {}
            flip = entry.get("flips", {}).get(mode)
            rows.append(
                [
                    name,
                    mode,
                    _fmt(m["suwen"]["accuracy"]),
                    str(m.get("confidence_measured", 0)),
                    _fmt(m.get("ece")),
                    _fmt(m.get("brier")),
                    _fmt(m.get("aurc")),
                    _fmt(at.get("0.80")),
                    _fmt(at.get("0.90")),
                    _fmt(at.get("0.95")),
                    str(flip["right_to_wrong"]) if flip else "–",
                    str(flip["wrong_to_right"]) if flip else "–",
                    _fmt(m.get("retrieved_share"), 2),
                    _fmt(m.get("calls_per_question"), 1),
                    _fmt(m.get("tokens_per_question"), 0),
                    str(m.get("abstained", 0)),
                ]
            )
    return rows


SIGNAL_HEADERS = (
    "Benchmark",
    "mode",
    "confidence",
    "cited relevance",
    "all claims cited",
    "agrees with plain",
)
SIGNALS = ("confidence", "cited_relevance", "all_claims_cited", "agrees_with_plain")


def signal_rows(metrics: Metrics) -> list[list[str]]:
    """AUROC of each signal for a right answer, per benchmark and mode."""
    rows = []
    for name, entry in metrics["benchmarks"].items():
        for mode, m in entry["modes"].items():
            found = m.get("signals") or {}
            rows.append([name, mode, *(_fmt(found.get(key)) for key in SIGNALS)])
    return rows


def flip_lines(metrics: Metrics) -> list[str]:
    """A few flipped answers per benchmark and mode, one line each."""
    lines = []
    for name, entry in metrics["benchmarks"].items():
        for mode, flip in entry.get("flips", {}).items():
            examples = flip["examples"]
            for label, shown in (
                ("right→wrong", examples["right_to_wrong"]),
                ("wrong→right", examples["wrong_to_right"]),
            ):
                for ex in shown:
                    why = f" ({ex['changed']})" if ex.get("changed") else ""
                    lines.append(
                        f"{name} {mode} {label} {ex['id']}: plain {ex['plain']!r}, "
                        f"{mode} {ex['now']!r}, gold {ex['gold']!r}{why}"
                    )
    return lines


# -- fitting the calibration file from a --calibrate run ----------------------------------------


def _pairs(records: Sequence[SampleRecord]) -> tuple[list[float], list[bool], list[str]]:
    kept = [r for r in records if r.confidence_raw is not None and r.correct is not None]
    return (
        [float(r.confidence_raw) for r in kept if r.confidence_raw is not None],
        [bool(r.correct) for r in kept],
        [f"{r.benchmark}/{r.id}" for r in kept],
    )


def _fit_group(
    key: str, by_mode: dict[str, list[SampleRecord]], calibration: CalibrationFile
) -> None:
    """Maps for every mode of one group (a benchmark, or an answer form pooled), and the
    adaptive threshold when plain and agent answered the same questions."""
    from suwen.evaluate.calibration import fit_map, map_key, routing_threshold

    for mode, records in by_mode.items():
        fitted = fit_map(*_pairs(records))
        if fitted is not None:
            calibration.maps[map_key(key, mode)] = fitted
    plain_map = calibration.maps.get(map_key(key, "plain"))
    if plain_map is None or "agent" not in by_mode:
        return
    agent = {(r.benchmark, r.id): r for r in by_mode["agent"] if r.correct is not None}
    plain = [
        r
        for r in by_mode["plain"]
        if (r.benchmark, r.id) in agent and r.confidence_raw is not None and r.correct is not None
    ]
    if plain:
        calibrated = plain_map.apply_all([float(r.confidence_raw or 0.0) for r in plain])
        calibration.thresholds[key] = routing_threshold(
            [float(v) for v in calibrated],
            [bool(r.correct) for r in plain],
            [bool(agent[(r.benchmark, r.id)].correct) for r in plain],
        )


def fit_from_run(out: Path, model: str, earlier: CalibrationFile | None) -> CalibrationFile:
    """The calibration file a ``--calibrate`` run in ``out`` teaches: one map per benchmark and
    mode and per answer form and mode (pooled over benchmarks), with adaptive thresholds;
    maps of an earlier file for the same model that this run does not replace are kept."""
    import json

    from suwen.evaluate.runner import RUN_FILE, read_records, samples_path

    run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    modes = list(run["config"]["modes"])
    keep = earlier if earlier is not None and earlier.model == model else None
    calibration = CalibrationFile(
        model=model,
        maps=dict(keep.maps) if keep else {},
        thresholds=dict(keep.thresholds) if keep else {},
    )
    pooled: dict[str, dict[str, list[SampleRecord]]] = {}
    for benchmark, ids in run["selections"].items():
        wanted = set(ids)
        by_mode = {
            mode: [r for r in read_records(samples_path(out, benchmark, mode)) if r.id in wanted]
            for mode in modes
        }
        _fit_group(benchmark, by_mode, calibration)
        for mode, records in by_mode.items():
            for record in records:
                pooled.setdefault(record.kind, {}).setdefault(mode, []).append(record)
    for kind, by_mode in pooled.items():
        _fit_group(kind, by_mode, calibration)
    return calibration
