"""metrics.json, report.md, report.html and chart.png, computed from the samples files alone.

Everything in the report is recomputed from the JSONL records (and run.json), so a report can be
rebuilt at any time and checked against the files it came from.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, cast

from suwen.errors import InputError
from suwen.evaluate import scoring_medevalkit as mek
from suwen.evaluate import text_metrics
from suwen.evaluate.benchmarks import benchmark_named
from suwen.evaluate.confidence_eval import (
    CONFIDENCE_HEADERS,
    SIGNAL_HEADERS,
    confidence_metrics,
    confidence_rows,
    flip_lines,
    flips_by_mode,
    signal_aurocs,
    signal_rows,
)
from suwen.evaluate.metric_types import (
    Accuracy,
    BenchmarkMetrics,
    ByType,
    CaseExampleEffect,
    Comparisons,
    ImageBaseline,
    MedEvalKitScore,
    Metrics,
    ModeExtras,
    ModeMetrics,
    NotComputed,
    Paired,
    ReportScores,
    RunInfo,
)
from suwen.evaluate.plots import confidence_plots
from suwen.evaluate.runner import (
    MODES,
    RUN_FILE,
    ModeRun,
    SampleRecord,
    answerer_of,
    condition_of,
    mode_named,
    mode_run_of,
    mode_runs,
    read_records,
    samples_path,
)
from suwen.evaluate.stats import PairedComparison, compare
from suwen.files import atomic_path, atomic_write_json, atomic_write_text

# Lingshu-7B's published plain-model accuracies (%), as the MedEvalKit README shows them
# (assets/mm_eval.png and assets/text_eval.png, updated 2025-08-18; README at commit 9b12e3b).
PUBLISHED_LINGSHU_7B: dict[str, float] = {
    "MMMU-Med": 54.0,
    "VQA-RAD": 67.9,
    "SLAKE": 83.1,
    "PathVQA": 61.9,
    "PMC-VQA": 56.3,
    "OmniMedVQA": 82.9,
    "MedXpertQA-MM": 26.7,
    "MMLU-Med": 74.5,
    "PubMedQA": 76.6,
    "MedMCQA": 55.9,
    "MedQA-USMLE": 63.3,
    "Medbullets": 56.2,
    "MedXpertQA-Text": 16.5,
}
PUBLISHED_SOURCE = (
    "Lingshu-7B, published: MedEvalKit README tables (assets/mm_eval.png, assets/text_eval.png, "
    "github.com/alibaba-damo-academy/MedEvalKit at 9b12e3b) for the Lingshu paper "
    "(arXiv:2506.07044). Full test sets, MedEvalKit's scoring, GPT-4.1 judge where it applies."
)
# Lingshu-7B's published report-generation row per benchmark (scores x100 stored as fractions,
# as the report's own values are). Source: the report-generation table of the Lingshu paper
# (arXiv:2506.07044) as the Lingshu project page publishes it ("Medical Report Generation
# Results", table8.png in github.com/alibaba-damo-academy/lingshu at 1ff31d8), read from that
# image. The table gives ROUGE-L, CIDEr, RaTE, SembScore and RadCliQ^-1; the first three are
# metrics this report computes. Its ROUGE-L stands in the column of the `rouge` package's
# ROUGE-L because that is the one MedEvalKit's released report script computes.
PUBLISHED_LINGSHU_7B_REPORTS: dict[str, dict[str, float]] = {
    "MIMIC-CXR": {"rougeL_rouge_package": 0.308, "cider": 1.094, "RaTE": 0.521},
    "CheXpert-Plus": {"rougeL_rouge_package": 0.265, "cider": 0.790, "RaTE": 0.454},
    "IU-Xray": {"rougeL_rouge_package": 0.412, "cider": 1.807, "RaTE": 0.576},
}
# The published columns this report does not compute (x100, as printed).
PUBLISHED_LINGSHU_7B_REPORTS_OTHER: dict[str, dict[str, float]] = {
    "MIMIC-CXR": {"SembScore": 30.0, "RadCliQ^-1": 69.2},
    "CheXpert-Plus": {"SembScore": 26.8, "RadCliQ^-1": 47.3},
    "IU-Xray": {"SembScore": 48.4, "RadCliQ^-1": 108.1},
}
PUBLISHED_REPORT_SOURCE = (
    "Lingshu-7B, published: the Lingshu paper's report-generation table (arXiv:2506.07044) as "
    "the Lingshu project page shows it (github.com/alibaba-damo-academy/lingshu, table8.png at "
    "1ff31d8). Its test sets, prompt handling and metric implementations, not this run's; "
    "CIDEr there is cidereval's (MedEvalKit's script), here pycocoevalcap's."
)


GROUPINGS = ("kind", "question_type", "modality", "body_part")


def _kind_group(kind: str) -> str:
    return "closed" if kind in ("yes_no", "closed") else kind


def _group_value(record: SampleRecord, grouping: str) -> str | None:
    if grouping == "kind":
        return _kind_group(record.kind)
    value = getattr(record, grouping)
    return None if value is None else str(value)


def _accuracy(records: Sequence[SampleRecord]) -> Accuracy:
    """Accuracy over the questions asked; those that could not be asked are counted apart
    (``not_asked``) and shown next to it, never silently dropped. An abstention is its own
    outcome, neither right nor wrong."""
    asked = [r for r in records if r.asked]
    scored = [r for r in asked if r.correct is not None and not r.abstained]
    right = sum(bool(r.correct) for r in scored)
    return {
        "accuracy": right / len(scored) if scored else None,
        "correct": right,
        "total": len(scored),
        "abstained": sum(r.abstained for r in asked),
        "not_asked": len(records) - len(asked),
        "unparsed": sum(r.unparsed for r in asked),
        "judge_unreadable": sum(1 for r in asked if r.judge and r.judge.suwen is None),
    }


def _medevalkit_score(score: mek.MekMetrics) -> MedEvalKitScore:
    # The model's dump has exactly MedEvalKitScore's keys (tests/test_eval_report.py checks).
    return cast(MedEvalKitScore, score.model_dump())


def _paired_dump(comparison: PairedComparison) -> Paired:
    # The model's dump has exactly Paired's keys (tests/test_eval_report.py checks).
    return cast(Paired, comparison.model_dump())


def _means(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    count = 0
    for row in rows:
        count += 1
        for key, value in row.items():
            sums[key] += value
    return {key: value / count for key, value in sums.items()} if count else {}


def mode_metrics(benchmark: str, records: Sequence[SampleRecord], judge_on: bool) -> ModeMetrics:
    family = benchmark_named(benchmark).medevalkit_family
    asked = [r for r in records if r.asked]
    mek_records = [
        mek.MekRecord(
            kind=r.kind, verdict=r.medevalkit, judge=r.judge.medevalkit if r.judge else None
        )
        for r in asked
    ]
    extras: ModeExtras = {"report_metrics": report_metrics(asked)} if family == "report" else {}
    return ModeMetrics(
        suwen=_accuracy(records),
        medevalkit=_medevalkit_score(mek.aggregate(family, mek_records, judge_on)),
        open_metrics=_means(r.metrics for r in asked if r.kind == "open"),
        latency_mean=_means({"s": r.latency} for r in records).get("s"),
        tokens_mean=_means({k: float(v) for k, v in r.tokens.items()} for r in records),
        with_citations=sum(1 for r in records if r.citations),
        **confidence_metrics(benchmark, records),
        not_asked_reasons=_reasons(records),
        **extras,
    )


REPORT_METRICS = (
    ("bleu1", "BLEU-1"),
    ("bleu2", "BLEU-2"),
    ("bleu3", "BLEU-3"),
    ("bleu4", "BLEU-4"),
    ("rougeL", "ROUGE-L"),
    ("rougeL_rouge_package", "ROUGE-L (MedEvalKit's `rouge`)"),
    ("meteor", "METEOR"),
    ("cider", "CIDEr"),
    ("RaTE", "RaTE"),
    ("GREEN", "GREEN"),
)


def _rouge_package_l(prediction: str, reference: str) -> float:
    """ROUGE-L F as MedEvalKit's report script gets it from the `rouge` package (re-implemented
    in scoring_medevalkit); 0 for what that package refuses (an empty report)."""
    try:
        return mek.rouge(prediction, reference)["rougel"]
    except mek.MedEvalKitCrashError:
        return 0.0


def report_metrics(records: Sequence[SampleRecord]) -> ReportScores:
    """The report-generation metrics MedEvalKit's report script computes, from the libraries
    that define them: sentence BLEU-1..4 and ROUGE-L averaged over the reports (an empty report
    scores 0 and stays in the denominator, as in that script), corpus METEOR and CIDEr, and the
    model-based RaTE and GREEN when their models are here. A metric that is not computed says
    why instead of giving a number."""
    predictions = [r.response for r in records]
    references = [r.gold for r in records]
    means = _means(r.metrics for r in records)
    values: dict[str, float | NotComputed | None] = {
        key: means.get(key) for key in ("bleu1", "bleu2", "bleu3", "bleu4")
    }
    values["rougeL"] = means.get("rougeL")
    values["rougeL_rouge_package"] = (
        sum(_rouge_package_l(p, g) for p, g in zip(predictions, references, strict=True))
        / len(records)
        if records
        else None
    )
    computed = {
        "meteor": text_metrics.meteor(predictions, references),
        "cider": text_metrics.cider(predictions, references),
        **text_metrics.model_based(predictions, references),
    }
    for key, value in computed.items():
        values[key] = (
            {"not_computed": value.reason} if isinstance(value, text_metrics.NotComputed) else value
        )
    return {"n": len(records), "values": values}


def _reasons(records: Sequence[SampleRecord]) -> dict[str, int]:
    """How many questions could not be asked, by reason (the question id taken out, so one
    cause counts once)."""
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        if not record.asked:
            reason = (record.not_asked_reason or "unknown").replace(record.id, "<id>")
            counts[reason] += 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _by_type(by_mode: dict[str, list[SampleRecord]]) -> ByType:
    groups: ByType = {}
    for grouping in GROUPINGS:
        table: dict[str, dict[str, Accuracy]] = defaultdict(dict)
        for mode, records in by_mode.items():
            buckets: dict[str, list[SampleRecord]] = defaultdict(list)
            for record in records:
                value = _group_value(record, grouping)
                if value is not None:
                    buckets[value].append(record)
            for value, bucket in buckets.items():
                table[value][mode] = _accuracy(bucket)
        if table:
            groups[grouping] = dict(sorted(table.items()))
    return groups


def benchmark_metrics(
    out: Path,
    benchmark: str,
    selection: list[str],
    modes: Sequence[str],
    judge_on: bool,
    seed: int = 0,
    case_examples: Sequence[int] = (),
) -> BenchmarkMetrics:
    """One benchmark's metrics, keyed by mode run (``agent``, or ``agent@examples2`` when
    case-example counts are compared)."""
    wanted = set(selection)
    by_mode: dict[str, list[SampleRecord]] = {}
    for run in mode_runs([m for m in MODES if m in modes], case_examples):
        path = samples_path(out, benchmark, run.key)
        if condition_of(run.mode) != "real" and not path.exists():
            continue  # an image baseline skipped for a benchmark without images
        by_mode[run.key] = [r for r in read_records(path) if r.id in wanted]
    per_mode = {
        mode: mode_metrics(benchmark, records, judge_on) for mode, records in by_mode.items()
    }
    for mode, records in by_mode.items():
        against = by_mode.get("plain") if mode != "plain" else None
        per_mode[mode]["signals"] = signal_aurocs(records, against)
    vs_plain = {
        key: found
        for key in agent_keys(by_mode)
        if (found := _paired(by_mode.get("plain"), by_mode[key], selection, seed)) is not None
    }
    key = benchmark_named(benchmark).published_key
    return {
        "expected": len(selection),
        "finished": {mode: len(records) for mode, records in by_mode.items()},
        "modes": per_mode,
        "by_type": _by_type(by_mode),
        "flips": flips_by_mode(by_mode, selection),
        "vs_plain": vs_plain,
        **_comparisons(by_mode, vs_plain, selection, case_examples, seed),
        "published_lingshu_7b": PUBLISHED_LINGSHU_7B.get(key) if key else None,
    }


def _comparisons(
    by_mode: dict[str, list[SampleRecord]],
    vs_plain: dict[str, Paired],
    selection: Sequence[str],
    case_examples: Sequence[int],
    seed: int,
) -> Comparisons:
    """The paired comparisons a run has: agent against plain, the image baselines, and the
    case-example counts against the first."""
    found: Comparisons = {}
    if "agent" in vs_plain:
        found["paired"] = vs_plain["agent"]
    baselines = image_baselines(by_mode, selection, seed)
    if baselines:
        found["image_baselines"] = baselines
    examples = case_example_effects(by_mode, selection, case_examples, seed)
    if examples:
        found["case_examples"] = examples
    return found


def agent_keys(by_mode: Mapping[str, object]) -> list[str]:
    """The agent's runs with the questions' own images: ``agent``, or one per case-example
    count compared (``agent@examples0``, ``agent@examples2``)."""
    return [key for key in by_mode if answerer_of(key) == "agent" and condition_of(key) == "real"]


def _paired(
    before: Sequence[SampleRecord] | None,
    after: Sequence[SampleRecord],
    selection: Sequence[str],
    seed: int,
) -> Paired | None:
    """``after`` against ``before`` on the questions both scored: Δ, bootstrap CI, McNemar,
    fixed and broken (``plain_*`` fields are ``before``'s, ``agent_*`` ``after``'s)."""
    if before is None:
        return None
    first = {r.id: r for r in before if r.correct is not None}
    then = {r.id: r for r in after if r.correct is not None}
    paired = [i for i in selection if i in first and i in then]
    if not paired:
        return None
    comparison = compare(
        [bool(first[i].correct) for i in paired],
        [bool(then[i].correct) for i in paired],
        seed=seed,
    )
    return _paired_dump(comparison)


def case_example_effects(
    by_mode: dict[str, list[SampleRecord]],
    selection: Sequence[str],
    counts: Sequence[int],
    seed: int,
) -> dict[str, dict[str, CaseExampleEffect]]:
    """For each mode the agent answered with several case-example counts: every other count
    against the first one listed (``--case-examples 0,2``: 2 against 0), paired on the same
    questions, as the plain-vs-agent comparison is."""
    result: dict[str, dict[str, CaseExampleEffect]] = {}
    if len(counts) < 2:
        return result
    for mode in MODES:
        baseline = ModeRun(mode, counts[0]).key
        if baseline not in by_mode:
            continue
        for count in counts[1:]:
            key = ModeRun(mode, count).key
            found = _paired(by_mode[baseline], by_mode.get(key, []), selection, seed)
            if found is not None:
                result.setdefault(mode, {})[f"{counts[0]}->{count}"] = {
                    "baseline": counts[0],
                    "examples": count,
                    **found,
                }
    return result


def _correct_by_id(records: Sequence[SampleRecord]) -> dict[str, bool]:
    return {r.id: bool(r.correct) for r in records if r.asked and r.correct is not None}


def image_baselines(
    by_mode: dict[str, list[SampleRecord]], selection: Sequence[str], seed: int
) -> dict[str, dict[str, ImageBaseline]]:
    """For each answerer run with its real images and a baseline: the baseline's accuracy and
    how many points the real image adds (real - baseline, paired on the questions both
    asked, with its bootstrap interval and McNemar p)."""
    result: dict[str, dict[str, ImageBaseline]] = {}
    for answerer in [k for k in by_mode if k == "plain" or k in agent_keys(by_mode)]:
        real = _correct_by_id(by_mode[answerer])
        run = mode_run_of(answerer)
        for condition in ("blank", "shuffled"):
            mode = ModeRun(mode_named(run.mode, condition), run.case_examples).key
            if mode not in by_mode:
                continue
            other = _correct_by_id(by_mode[mode])
            paired = [i for i in selection if i in real and i in other]
            if not paired:
                continue
            comparison = compare([other[i] for i in paired], [real[i] for i in paired], seed=seed)
            result.setdefault(answerer, {})[condition] = {
                "n": len(paired),
                "real_accuracy": comparison.agent_accuracy,
                "baseline_accuracy": comparison.plain_accuracy,
                "image_adds": comparison.delta,
                "ci95": comparison.ci95,
                "mcnemar_p": comparison.mcnemar_p,
                "share_without_image": (
                    comparison.plain_accuracy / comparison.agent_accuracy
                    if comparison.agent_accuracy
                    else None
                ),
            }
    return result


def build_metrics(out: Path) -> Metrics:
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise InputError(f"{out}: no {RUN_FILE} here (not an evaluation output directory)")
    run = json.loads(run_file.read_text(encoding="utf-8"))
    config = run["config"]
    modes: list[str] = [m for m in MODES if m in config["modes"]]
    return {
        "run": {
            "model": config.get("model", ""),
            "modes": modes,
            "judge": config["judge"],
            "leakage_guard": not config["allow_leak"],
            "limit": config.get("limit"),
            "seed": config.get("seed"),
            "data": config.get("data"),
            "lang": config.get("lang"),
            "sampling": config.get("sampling"),
            "images": config.get("images"),
            "max_tokens": config.get("max_tokens"),
            "case_examples": config.get("case_examples") or [],
            "provenance": run.get("provenance", {}),
        },
        "published_source": PUBLISHED_SOURCE,
        "benchmarks": {
            name: benchmark_metrics(
                out,
                name,
                ids,
                modes,
                config["judge"],
                int(config.get("seed") or 0),
                config.get("case_examples") or [],
            )
            for name, ids in run["selections"].items()
        },
    }


# --------------------------------------------------------------------------------------------
# Rendering


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def signed_pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


Scorer = Literal["suwen", "medevalkit"]


def _scored(metrics: ModeMetrics, scorer: Scorer) -> tuple[float | None, int | None, int]:
    """(accuracy, right, total) by Suwen's scorer or by MedEvalKit's rules."""
    if scorer == "suwen":
        ours = metrics["suwen"]
        return ours["accuracy"], ours["correct"], ours["total"]
    theirs = metrics["medevalkit"]
    return theirs["accuracy"], theirs["right"], theirs["total"]


def _mode_acc(entry: BenchmarkMetrics, mode: str, scorer: Scorer) -> float | None:
    metrics = entry["modes"].get(mode)
    if metrics is None:
        return None
    value = _scored(metrics, scorer)[0]
    return None if value is None else float(value)


def acc_cell(entry: BenchmarkMetrics, mode: str, scorer: Scorer) -> str:
    """Accuracy with its denominator, and the questions that could not be asked beside it:
    "62.5 (10/16; 2 not asked)"."""
    metrics = entry["modes"].get(mode)
    if metrics is None:
        return "–"
    accuracy, right, total = _scored(metrics, scorer)
    if accuracy is None:
        return "–"
    cell = f"{pct(accuracy)} ({right}/{total}"
    not_asked = metrics["suwen"]["not_asked"]
    return cell + (f"; {not_asked} not asked)" if not_asked else ")")


HEADERS = (
    "Benchmark",
    "done (plain/agent) of n",
    "plain",
    "agent",
    "Δ",
    "95% CI of Δ",
    "McNemar p",
    "fixed",
    "broken",
    "plain (medevalkit)",
    "agent (medevalkit)",
    "Lingshu-7B (published)",
)


def _agent_columns(entry: BenchmarkMetrics) -> list[str]:
    """The agent runs the main table shows against plain: one row each (``agent`` when no
    case-example counts are compared)."""
    return agent_keys(entry["modes"]) or ["agent"]


def _row_name(name: str, key: str) -> str:
    count = mode_run_of(key).case_examples
    return name if count is None else f"{name}, {count} case examples"


def table_rows(metrics: Metrics) -> list[list[str]]:
    rows = []
    for name, entry in metrics["benchmarks"].items():
        for agent in _agent_columns(entry):
            rows.append(_table_row(name, entry, agent))
    return rows


def _table_row(name: str, entry: BenchmarkMetrics, agent: str) -> list[str]:
    """Plain against one agent run on one benchmark."""
    paired = entry.get("vs_plain", {}).get(agent) or (
        entry.get("paired") if agent == "agent" else None
    )
    published = entry["published_lingshu_7b"]
    finished = "/".join(str(n) for mode, n in entry["finished"].items() if mode in ("plain", agent))
    return [
        _row_name(name, agent),
        f"{finished} of {entry['expected']}",
        acc_cell(entry, "plain", "suwen"),
        acc_cell(entry, agent, "suwen"),
        signed_pct(paired["delta"]) if paired else "–",
        f"[{signed_pct(paired['ci95'][0])}, {signed_pct(paired['ci95'][1])}]" if paired else "–",
        f"{paired['mcnemar_p']:.3g}" if paired else "–",
        str(paired["fixed"]) if paired else "–",
        str(paired["broken"]) if paired else "–",
        acc_cell(entry, "plain", "medevalkit"),
        acc_cell(entry, agent, "medevalkit"),
        "–" if published is None else f"{published:.1f}*",
    ]


def type_rows(metrics: Metrics) -> list[list[str]]:
    rows = []
    for name, entry in metrics["benchmarks"].items():
        for key in _agent_columns(entry):
            rows += _type_rows(_row_name(name, key), entry, key)
    return rows


def _type_rows(name: str, entry: BenchmarkMetrics, agent_key: str) -> list[list[str]]:
    rows = []
    for grouping, table in entry["by_type"].items():
        for value, per_mode in table.items():
            plain, agent = per_mode.get("plain"), per_mode.get(agent_key)
            either = plain or agent
            n = either["total"] if either else 0
            rows.append(
                [
                    name,
                    grouping,
                    value,
                    str(n),
                    pct(plain["accuracy"]) if plain else "–",
                    pct(agent["accuracy"]) if agent else "–",
                ]
            )
    return rows


BASELINE_HEADERS = (
    "Benchmark",
    "answerer",
    "n",
    "real image",
    "blank image",
    "real − blank [95% CI]",
    "shuffled image",
    "real − shuffled [95% CI]",
)


def _gain(row: ImageBaseline | None) -> str:
    if row is None:
        return "–"
    low, high = row["ci95"]
    return f"{signed_pct(row['image_adds'])} [{signed_pct(low)}, {signed_pct(high)}]"


def baseline_rows(metrics: Metrics) -> list[list[str]]:
    """Per benchmark and answerer: accuracy with the real image, a blank one and another
    question's image, and how many points the real image adds (paired)."""
    rows = []
    for name, entry in metrics["benchmarks"].items():
        for answerer, by_condition in entry.get("image_baselines", {}).items():
            blank, shuffled = by_condition.get("blank"), by_condition.get("shuffled")
            first = blank or shuffled
            rows.append(
                [
                    name,
                    answerer,
                    "/".join(str(c["n"]) for c in (blank, shuffled) if c),
                    pct(first["real_accuracy"] if first else None),
                    pct(blank["baseline_accuracy"]) if blank else "–",
                    _gain(blank),
                    pct(shuffled["baseline_accuracy"]) if shuffled else "–",
                    _gain(shuffled),
                ]
            )
    return rows


CASE_EXAMPLE_HEADERS = (
    "Benchmark",
    "mode",
    "n",
    "examples",
    "baseline",
    "with examples",
    "Δ [95% CI]",
    "McNemar p",
    "fixed",
    "broken",
)


def case_example_rows(metrics: Metrics) -> list[list[str]]:
    """Per benchmark and mode: each case-example count against the first one listed."""
    rows = []
    for name, entry in metrics["benchmarks"].items():
        for mode, pairs in entry.get("case_examples", {}).items():
            for found in pairs.values():
                low, high = found["ci95"]
                rows.append(
                    [
                        name,
                        mode,
                        str(found["n"]),
                        f"{found['baseline']} → {found['examples']}",
                        pct(found["plain_accuracy"]),
                        pct(found["agent_accuracy"]),
                        f"{signed_pct(found['delta'])} [{signed_pct(low)}, {signed_pct(high)}]",
                        f"{found['mcnemar_p']:.3g}",
                        str(found["fixed"]),
                        str(found["broken"]),
                    ]
                )
    return rows


REPORT_HEADERS = ("Benchmark", "mode", "n", *(label for _, label in REPORT_METRICS))


def _metric_cell(value: float | NotComputed | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return "not computed"
    return f"{100 * float(value):.1f}"


def report_rows(metrics: Metrics) -> list[list[str]]:
    """Report-generation scores (×100) per mode, with Lingshu's published row when known."""
    rows = []
    for name, entry in metrics["benchmarks"].items():
        for mode, m in entry["modes"].items():
            report = m.get("report_metrics")
            if report is None:
                continue
            cells = [_metric_cell(report["values"].get(key)) for key, _ in REPORT_METRICS]
            rows.append([name, mode, str(report["n"]), *cells])
        published = PUBLISHED_LINGSHU_7B_REPORTS.get(name)
        if published is not None:
            cells = [_metric_cell(published.get(key)) for key, _ in REPORT_METRICS]
            rows.append([name, "Lingshu-7B (published)*", "–", *cells])
    return rows


def not_computed_notes(metrics: Metrics) -> list[str]:
    lines = []
    for name, entry in metrics["benchmarks"].items():
        seen: set[str] = set()
        for m in entry["modes"].values():
            for key, value in m.get("report_metrics", {}).get("values", {}).items():
                if isinstance(value, dict) and key not in seen:
                    seen.add(key)
                    lines.append(f"{name}: {key} not computed: {value['not_computed']}")
        other = PUBLISHED_LINGSHU_7B_REPORTS_OTHER.get(name)
        if "report" in {_kind_group(k) for k in _kinds(entry)} and other:
            shown = ", ".join(f"{key} {value:.1f}" for key, value in other.items())
            lines.append(
                f"{name}: Lingshu-7B's published row* also gives {shown} (not computed here). "
                f"* {PUBLISHED_REPORT_SOURCE}"
            )
    return lines


def _kinds(entry: BenchmarkMetrics) -> set[str]:
    return set(entry["by_type"].get("kind", {}))


def notes(metrics: Metrics) -> list[str]:
    lines = []
    lang = metrics["run"].get("lang")
    if lang:
        lines.append(
            f"Only {lang} questions (--lang {lang}); MedEvalKit and the published SLAKE number "
            "use both languages, so SLAKE here is not the published table's number."
        )
    for name, entry in metrics["benchmarks"].items():
        for mode, m in entry["modes"].items():
            for reason, count in m.get("not_asked_reasons", {}).items():
                lines.append(f"{name} {mode}: {count} not asked: {reason}")
            if m["suwen"]["unparsed"]:
                lines.append(
                    f"{name} {mode}: {m['suwen']['unparsed']} unparsed answers "
                    "(scored wrong by Suwen)."
                )
            if m["medevalkit"]["crash"]:
                lines.append(
                    f"{name} {mode}: MedEvalKit's scorer would stop here "
                    f"({m['medevalkit']['crash']}), so it gives no number."
                )
            if m["medevalkit"].get("open_accuracy") is not None:
                lines.append(
                    f"{name} {mode}: MedEvalKit's 'open acc' would read "
                    f"{pct(m['medevalkit']['open_accuracy'])} (divided twice)."
                )
    return lines


def _run_line(run: RunInfo) -> str:
    guard = (
        "on: retrieval excluded each question's own source (PubMedQA's abstract, the test image)"
        if run["leakage_guard"]
        else "OFF (--allow-leak): retrieval could see each question's own source"
    )
    return (
        f"Model: `{run['model'] or 'unknown'}`; modes: {', '.join(run['modes'])}; judge: "
        f"{'on' if run['judge'] else 'off'}; limit: {run['limit'] or 'all'}; "
        f"seed: {run['seed']}; languages: {run.get('lang') or 'all'}"
        + (
            f"; case examples compared: {', '.join(map(str, run['case_examples']))}"
            if run.get("case_examples")
            else ""
        )
        + f". Leakage guard {guard}."
    )


def _setup_line(run: RunInfo) -> str:
    """Sampling, images, model revision and server version: what the answers came from."""
    parts = []
    sampling = run.get("sampling")
    if sampling:
        parts.append(
            "Sampling sent with every request: "
            + ", ".join(f"{k}={v}" for k, v in sampling.items())
            + f", max_tokens={run.get('max_tokens')}"
        )
    images = run.get("images")
    if images:
        parts.append(
            f"images: {images['min_pixels']}..{images['max_pixels']} pixels, up to "
            f"{images['max_images']} per question"
            + (", '<image_i>: ' labels where MedEvalKit uses them" if images["labels"] else "")
        )
    provenance = run.get("provenance") or {}
    model = provenance.get("model")
    if model:
        revision = model.get("revision") or (model.get("config_sha256") or "unknown")[:12]
        parts.append(f"model revision: {revision}")
    versions = {v for v in (provenance.get("vllm_version") or {}).values() if v}
    if versions:
        parts.append(f"vLLM {', '.join(sorted(versions))}")
    return "; ".join(parts) + "." if parts else ""


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(
    metrics: Metrics, chart: str | None, plots: dict[str, list[str]] | None = None
) -> str:
    parts = [
        "# Suwen evaluation: plain model vs agent",
        "",
        _run_line(metrics["run"]),
        "",
        _setup_line(metrics["run"]),
        "",
        "Accuracy (%) by Suwen's scorer (headline) and by MedEvalKit's rules as they behave. "
        "Δ = agent − plain on the same questions; fixed = wrong in plain, right with the agent; "
        "broken = the reverse.",
        "",
        _md_table(HEADERS, table_rows(metrics)),
        "",
        f"\\* {metrics['published_source']} Not from this run.",
        "",
    ]
    if chart:
        parts += [f"![plain vs agent]({chart})", ""]
    for title, intro, headers, rows in extra_tables(metrics):
        parts += [f"## {title}", "", intro, "", _md_table(headers, rows), ""]
    parts += [
        "## By question type",
        "",
        _md_table(("Benchmark", "grouping", "value", "n", "plain", "agent"), type_rows(metrics)),
        "",
    ]
    parts += _confidence_markdown(metrics, plots or {})
    extra = notes(metrics) + not_computed_notes(metrics)
    if extra:
        parts += ["## Scoring notes", "", *[f"- {line}" for line in extra], ""]
    return "\n".join(parts)


CONFIDENCE_INTRO = (
    "Confidence is the model's probability of its answer (option letters, yes/no) or its "
    "self-check (open answers); calibrated when a calibration map applied. ECE over 15 bins, "
    "Brier, AURC (area under the risk-coverage curve) and accuracy of the most confident "
    "80/90/95% are on held-out questions; flips are against plain mode on the same questions; "
    "retrieved = share of adaptive answers that ran the agent."
)


SIGNALS_INTRO = (
    "How well each signal tells right answers from wrong ones (AUROC; 0.5 = chance, 1 = "
    "perfect): the confidence, the reread relevance of the cited evidence, whether every claim "
    "is cited, and whether the answer agrees with plain mode's."
)


def _confidence_markdown(metrics: Metrics, plots: dict[str, list[str]]) -> list[str]:
    parts = [
        "## Confidence, calibration and cost",
        "",
        CONFIDENCE_INTRO,
        "",
        _md_table(CONFIDENCE_HEADERS, confidence_rows(metrics)),
        "",
    ]
    parts += [SIGNALS_INTRO, "", _md_table(SIGNAL_HEADERS, signal_rows(metrics)), ""]
    for name, files in plots.items():
        parts += [f"![{name}]({file})" for file in files] + [""]
    flipped = flip_lines(metrics)
    if flipped:
        parts += ["### Flipped answers (examples)", "", *[f"- {line}" for line in flipped], ""]
    return parts


def _confidence_html(metrics: Metrics, plots: dict[str, list[str]]) -> list[str]:
    parts = [
        "<h2>Confidence, calibration and cost</h2>",
        f"<p>{html.escape(CONFIDENCE_INTRO)}</p>",
        _html_table(CONFIDENCE_HEADERS, confidence_rows(metrics)),
        f"<p>{html.escape(SIGNALS_INTRO)}</p>",
        _html_table(SIGNAL_HEADERS, signal_rows(metrics)),
    ]
    for name, files in plots.items():
        parts += [f"<img src='{html.escape(f)}' alt='{html.escape(name)}'>" for f in files]
    flipped = flip_lines(metrics)
    if flipped:
        parts += ["<h3>Flipped answers (examples)</h3><ul>"]
        parts += [f"<li>{html.escape(line)}</li>" for line in flipped] + ["</ul>"]
    return parts


Table = tuple[str, str, Sequence[str], list[list[str]]]


def extra_tables(metrics: Metrics) -> list[Table]:
    """The image-baseline and report-generation tables, when the run has them."""
    tables: list[Table] = []
    baselines = baseline_rows(metrics)
    if baselines:
        tables.append(
            (
                "How much comes from the image",
                "Accuracy (%, Suwen's scorer) with the question's own image, a black image of "
                "the same size, and another question's image from the same benchmark; "
                "real − baseline is paired on the questions both asked.",
                BASELINE_HEADERS,
                baselines,
            )
        )
    examples = case_example_rows(metrics)
    if examples:
        tables.append(
            (
                "Similar cases as worked examples",
                "Accuracy (%, Suwen's scorer) of the agent showing each number of kept similar "
                "cases as worked examples (--case-examples), against the first count listed, "
                "paired on the same questions: Δ with its 95% bootstrap interval and McNemar "
                "p; fixed = wrong with the first count, right with this one; broken = the "
                "reverse.",
                CASE_EXAMPLE_HEADERS,
                examples,
            )
        )
    reports = report_rows(metrics)
    if reports:
        tables.append(
            (
                "Report generation",
                "Scores ×100 from the libraries that define them (BLEU: nltk; ROUGE-L: "
                "rouge-score, and the `rouge` package MedEvalKit's script uses; METEOR 1.5 and "
                "CIDEr: pycocoevalcap), averaged over the reports as MedEvalKit's report script "
                "does.",
                REPORT_HEADERS,
                reports,
            )
        )
    return tables


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(
    metrics: Metrics, chart: str | None, plots: dict[str, list[str]] | None = None
) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:4px 8px;text-align:right}td:first-child{text-align:left}"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Suwen evaluation</title><style>{style}</style></head><body>",
        "<h1>Suwen evaluation: plain model vs agent</h1>",
        f"<p>{html.escape(_run_line(metrics['run']))}</p>",
        f"<p>{html.escape(_setup_line(metrics['run']))}</p>",
        _html_table(HEADERS, table_rows(metrics)),
        f"<p>* {html.escape(metrics['published_source'])} Not from this run.</p>",
    ]
    if chart:
        parts.append(f"<img src='{html.escape(chart)}' alt='plain vs agent'>")
    for title, intro, headers, rows in extra_tables(metrics):
        parts += [
            f"<h2>{html.escape(title)}</h2><p>{html.escape(intro)}</p>",
            _html_table(headers, rows),
        ]
    parts += [
        "<h2>By question type</h2>",
        _html_table(("Benchmark", "grouping", "value", "n", "plain", "agent"), type_rows(metrics)),
    ]
    parts += _confidence_html(metrics, plots or {})
    extra = notes(metrics) + not_computed_notes(metrics)
    if extra:
        parts += [
            "<h2>Scoring notes</h2><ul>",
            *[f"<li>{html.escape(line)}</li>" for line in extra],
            "</ul>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _chart_acc(entry: BenchmarkMetrics, mode: str) -> float | None:
    """Plain's accuracy, or the agent's (with the most case examples compared, listed last)."""
    key = mode if mode == "plain" else _agent_columns(entry)[-1]
    return _mode_acc(entry, key, "suwen")


def render_chart(metrics: Metrics, path: Path) -> bool:
    """Grouped bars of plain vs agent accuracy per benchmark (published Lingshu-7B as ticks)."""
    names = [
        n
        for n, e in metrics["benchmarks"].items()
        if any(m["suwen"]["accuracy"] is not None for m in e["modes"].values())
    ]
    if not names:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(6.0, 1.4 * len(names) + 2), 4.5))
    width = 0.38
    for offset, mode in ((-width / 2, "plain"), (width / 2, "agent")):
        values = [100 * (_chart_acc(metrics["benchmarks"][n], mode) or 0.0) for n in names]
        axes.bar([i + offset for i in range(len(names))], values, width, label=mode)
    published = [(i, metrics["benchmarks"][n]["published_lingshu_7b"]) for i, n in enumerate(names)]
    shown = [(i, v) for i, v in published if v is not None]
    if shown:
        axes.scatter(
            [i - width / 2 for i, _ in shown],
            [v for _, v in shown],
            marker="_",
            s=600,
            color="black",
            label="Lingshu-7B published (plain)",
        )
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel("accuracy (%), Suwen scorer")
    axes.set_ylim(0, 100)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return True


def write_report(out: Path) -> Metrics:
    """(Re)build metrics.json, report.md, report.html and chart.png in ``out``."""
    metrics = build_metrics(out)
    chart = "chart.png" if render_chart(metrics, out / "chart.png") else None
    plots = confidence_plots(metrics, out)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", render_markdown(metrics, chart, plots))
    atomic_write_text(out / "report.html", render_html(metrics, chart, plots))
    return metrics
