"""metrics.json, report.md, report.html and chart.png, computed from the samples files alone.

Everything in the report is recomputed from the JSONL records (and run.json), so a report can be
rebuilt at any time and checked against the files it came from.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from suwen.errors import InputError
from suwen.evaluate import scoring_medevalkit as mek
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
from suwen.evaluate.plots import confidence_plots
from suwen.evaluate.runner import MODES, RUN_FILE, SampleRecord, read_records, samples_path
from suwen.evaluate.stats import compare

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
GROUPINGS = ("kind", "question_type", "modality", "body_part")


def _kind_group(kind: str) -> str:
    return "closed" if kind in ("yes_no", "closed") else kind


def _group_value(record: SampleRecord, grouping: str) -> str | None:
    if grouping == "kind":
        return _kind_group(record.kind)
    value = getattr(record, grouping)
    return None if value is None else str(value)


def _accuracy(records: Sequence[SampleRecord]) -> dict[str, Any]:
    # An abstention is its own outcome, neither right nor wrong.
    scored = [r for r in records if r.correct is not None and not r.abstained]
    right = sum(bool(r.correct) for r in scored)
    return {
        "accuracy": right / len(scored) if scored else None,
        "correct": right,
        "total": len(scored),
        "abstained": sum(r.abstained for r in records),
        "unparsed": sum(r.unparsed for r in records),
        "judge_unreadable": sum(1 for r in records if r.judge and r.judge.suwen is None),
    }


def _means(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    count = 0
    for row in rows:
        count += 1
        for key, value in row.items():
            sums[key] += value
    return {key: value / count for key, value in sums.items()} if count else {}


def mode_metrics(benchmark: str, records: Sequence[SampleRecord], judge_on: bool) -> dict[str, Any]:
    family = benchmark_named(benchmark).medevalkit_family
    mek_records = [
        mek.MekRecord(
            kind=r.kind, verdict=r.medevalkit, judge=r.judge.medevalkit if r.judge else None
        )
        for r in records
    ]
    return {
        "suwen": _accuracy(records),
        "medevalkit": mek.aggregate(family, mek_records, judge_on).model_dump(),
        "open_metrics": _means(r.metrics for r in records if r.kind in ("open", "report")),
        "latency_mean": _means({"s": r.latency} for r in records).get("s"),
        "tokens_mean": _means({k: float(v) for k, v in r.tokens.items()} for r in records),
        "with_citations": sum(1 for r in records if r.citations),
        **confidence_metrics(benchmark, records),
    }


def _by_type(by_mode: dict[str, list[SampleRecord]]) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    for grouping in GROUPINGS:
        table: dict[str, dict[str, Any]] = defaultdict(dict)
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
) -> dict[str, Any]:
    wanted = set(selection)
    by_mode: dict[str, list[SampleRecord]] = {}
    for mode in modes:
        records = read_records(samples_path(out, benchmark, mode))  # type: ignore[arg-type]
        by_mode[mode] = [r for r in records if r.id in wanted]
    entry: dict[str, Any] = {
        "expected": len(selection),
        "finished": {mode: len(records) for mode, records in by_mode.items()},
        "modes": {
            mode: mode_metrics(benchmark, records, judge_on) for mode, records in by_mode.items()
        },
        "by_type": _by_type(by_mode),
        "flips": flips_by_mode(by_mode, selection),
    }
    for mode, records in by_mode.items():
        against = by_mode.get("plain") if mode != "plain" else None
        entry["modes"][mode]["signals"] = signal_aurocs(records, against)
    if "plain" in by_mode and "agent" in by_mode:
        plain = {r.id: r for r in by_mode["plain"] if r.correct is not None}
        agent = {r.id: r for r in by_mode["agent"] if r.correct is not None}
        paired = [i for i in selection if i in plain and i in agent]
        if paired:
            comparison = compare(
                [bool(plain[i].correct) for i in paired],
                [bool(agent[i].correct) for i in paired],
                seed=seed,
            )
            entry["paired"] = comparison.model_dump()
    key = benchmark_named(benchmark).published_key
    entry["published_lingshu_7b"] = PUBLISHED_LINGSHU_7B.get(key) if key else None
    return entry


def build_metrics(out: Path) -> dict[str, Any]:
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise InputError(f"{out}: no {RUN_FILE} here (not an evaluation output directory)")
    run = json.loads(run_file.read_text(encoding="utf-8"))
    config = run["config"]
    modes = [m for m in MODES if m in config["modes"]]
    return {
        "run": {
            "model": config.get("model", ""),
            "modes": modes,
            "judge": config["judge"],
            "leakage_guard": not config["allow_leak"],
            "limit": config.get("limit"),
            "seed": config.get("seed"),
            "data": config.get("data"),
        },
        "published_source": PUBLISHED_SOURCE,
        "benchmarks": {
            name: benchmark_metrics(
                out, name, ids, modes, config["judge"], int(config.get("seed") or 0)
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


def _mode_acc(entry: dict[str, Any], mode: str, scorer: str) -> float | None:
    metrics = entry["modes"].get(mode)
    if metrics is None:
        return None
    value = metrics[scorer]["accuracy"]
    return None if value is None else float(value)


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


def table_rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, entry in metrics["benchmarks"].items():
        paired = entry.get("paired")
        published = entry["published_lingshu_7b"]
        finished = "/".join(str(n) for n in entry["finished"].values())
        rows.append(
            [
                name,
                f"{finished} of {entry['expected']}",
                pct(_mode_acc(entry, "plain", "suwen")),
                pct(_mode_acc(entry, "agent", "suwen")),
                signed_pct(paired["delta"]) if paired else "–",
                f"[{signed_pct(paired['ci95'][0])}, {signed_pct(paired['ci95'][1])}]"
                if paired
                else "–",
                f"{paired['mcnemar_p']:.3g}" if paired else "–",
                str(paired["fixed"]) if paired else "–",
                str(paired["broken"]) if paired else "–",
                pct(_mode_acc(entry, "plain", "medevalkit")),
                pct(_mode_acc(entry, "agent", "medevalkit")),
                "–" if published is None else f"{published:.1f}*",
            ]
        )
    return rows


def type_rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, entry in metrics["benchmarks"].items():
        for grouping, table in entry["by_type"].items():
            for value, per_mode in table.items():
                plain, agent = per_mode.get("plain"), per_mode.get("agent")
                n = (plain or agent or {}).get("total", 0)
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


def notes(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for name, entry in metrics["benchmarks"].items():
        for mode, m in entry["modes"].items():
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


def _run_line(run: dict[str, Any]) -> str:
    guard = (
        "on: retrieval excluded each question's own source (PubMedQA's abstract, the test image)"
        if run["leakage_guard"]
        else "OFF (--allow-leak): retrieval could see each question's own source"
    )
    return (
        f"Model: `{run['model'] or 'unknown'}`; modes: {', '.join(run['modes'])}; judge: "
        f"{'on' if run['judge'] else 'off'}; limit: {run['limit'] or 'all'}; "
        f"seed: {run['seed']}. Leakage guard {guard}."
    )


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(
    metrics: dict[str, Any], chart: str | None, plots: dict[str, list[str]] | None = None
) -> str:
    parts = [
        "# Suwen evaluation: plain model vs agent",
        "",
        _run_line(metrics["run"]),
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
    parts += [
        "## By question type",
        "",
        _md_table(("Benchmark", "grouping", "value", "n", "plain", "agent"), type_rows(metrics)),
        "",
    ]
    parts += _confidence_markdown(metrics, plots or {})
    extra = notes(metrics)
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


def _confidence_markdown(metrics: dict[str, Any], plots: dict[str, list[str]]) -> list[str]:
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


def _confidence_html(metrics: dict[str, Any], plots: dict[str, list[str]]) -> list[str]:
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


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(
    metrics: dict[str, Any], chart: str | None, plots: dict[str, list[str]] | None = None
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
        _html_table(HEADERS, table_rows(metrics)),
        f"<p>* {html.escape(metrics['published_source'])} Not from this run.</p>",
    ]
    if chart:
        parts.append(f"<img src='{html.escape(chart)}' alt='plain vs agent'>")
    parts += [
        "<h2>By question type</h2>",
        _html_table(("Benchmark", "grouping", "value", "n", "plain", "agent"), type_rows(metrics)),
    ]
    parts += _confidence_html(metrics, plots or {})
    extra = notes(metrics)
    if extra:
        parts += [
            "<h2>Scoring notes</h2><ul>",
            *[f"<li>{html.escape(line)}</li>" for line in extra],
            "</ul>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_chart(metrics: dict[str, Any], path: Path) -> bool:
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
        values = [100 * (_mode_acc(metrics["benchmarks"][n], mode, "suwen") or 0.0) for n in names]
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
    tmp = path.with_name(path.name + ".part")
    figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    tmp.replace(path)
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(out: Path) -> dict[str, Any]:
    """(Re)build metrics.json, report.md, report.html and chart.png in ``out``."""
    metrics = build_metrics(out)
    chart = "chart.png" if render_chart(metrics, out / "chart.png") else None
    plots = confidence_plots(metrics, out)
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(out / "report.md", render_markdown(metrics, chart, plots))
    _write_atomic(out / "report.html", render_html(metrics, chart, plots))
    return metrics
