"""`suwen eval`: the agent against the plain model on MedEvalKit's benchmarks, side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import typer

from suwen.commands import answering
from suwen.commands.common import (
    console,
    err_console,
    literal_line,
    print_note,
    settings_of,
)
from suwen.errors import InputError, NotDoneError

if TYPE_CHECKING:
    from suwen.evaluate.prompts import Lang
    from suwen.evaluate.runner import ModeSummary, Progress
    from suwen.evaluate.session import StoredCalibration


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def eval_command(
    ctx: typer.Context,
    benchmark: list[str] = typer.Option(
        ..., "--benchmark", "-b", help="Benchmark name(s), comma-separated or repeated."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Folder with local benchmark files (default: the hub datasets)."
    ),
    modes: str = typer.Option(
        "plain,agent",
        "--modes",
        help="plain, agent, adaptive, and the image baselines blank (a black image of the "
        "same size) and shuffled (another question's image), comma-separated; blank/shuffled "
        "apply to plain and agent as given.",
    ),
    lang: str | None = typer.Option(
        None, "--lang", help="Only questions in this language: en or zh (SLAKE has both)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (re-running resumes)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Questions per benchmark."),
    seed: int = typer.Option(0, "--seed", help="Seed for --limit sampling and the bootstrap."),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        min=1,
        help="Questions in flight, in all (default: setting, 8, per agent process).",
    ),
    processes: int | None = answering.PROCESSES_OPTION,
    judge: bool = typer.Option(False, "--judge", help="MedEvalKit's LLM judge for open answers."),
    allow_leak: bool = typer.Option(
        False, "--allow-leak", help="Let retrieval see each question's own source."
    ),
    vllm_url: list[str] = typer.Option([], "--vllm-url", help="Running vLLM server(s) to use."),
    calibrate: bool = typer.Option(
        False,
        "--calibrate",
        help="Ask only the dev split and fit the calibration maps (stored in the data home).",
    ),
    abstain_below: float | None = typer.Option(
        None, "--abstain-below", help="Record answers below this confidence as abstentions."
    ),
    case_examples: str | None = typer.Option(
        None,
        "--case-examples",
        help="Compare numbers of similar cases shown as worked examples, e.g. 0,2: each agent "
        "mode runs once per count and the report gives the difference per benchmark "
        "(default: once, with the case_examples setting).",
    ),
) -> None:
    """Score plain Lingshu and the Suwen agent on the same questions, with MedEvalKit's prompts.

    Writes per-question JSONL, metrics.json, report.md, report.html and a chart into --out.
    """
    from suwen.evaluate.benchmarks import benchmark_named
    from suwen.evaluate.runner import (
        MEDEVALKIT_SAMPLING,
        EvalConfig,
        ImagePolicy,
        parse_modes,
        processes_for_modes,
    )

    settings = settings_of(ctx)
    children = answering.agent_processes(settings, processes)
    if abstain_below is not None and not 0 <= abstain_below <= 1:
        raise InputError(f"--abstain-below {abstain_below}: must be between 0 and 1")
    if lang not in (None, "en", "zh"):
        raise InputError(f"--lang {lang!r}: expected en or zh")
    chosen = parse_modes(modes)
    children = processes_for_modes(children, chosen)
    settings = settings.model_copy(update={"processes": children})
    names = [benchmark_named(name).name for name in _split(benchmark)]
    counts = parse_case_examples(case_examples) if case_examples is not None else []
    config = EvalConfig(
        benchmarks=names,
        data=data,
        modes=chosen,
        out=out,
        limit=limit,
        seed=seed,
        # Unless given, each agent process gets the setting's number of questions in flight.
        concurrency=concurrency or settings.concurrency * children,
        judge=judge,
        allow_leak=allow_leak,
        max_tokens=settings.max_tokens,
        sampling=MEDEVALKIT_SAMPLING,
        images=ImagePolicy(
            min_pixels=settings.eval_image_min_pixels,
            max_pixels=settings.eval_image_max_pixels,
            max_images=settings.eval_max_images,
        ),
        lang=cast("Lang | None", lang),
        model=settings.vlm,
        calibrate=calibrate,
        abstain_below=abstain_below if abstain_below is not None else settings.abstain_below,
        case_examples=counts,
    )
    from suwen.evaluate.session import evaluate, select_questions

    samples = select_questions(settings, config)
    total = sum(len(items) for items in samples.values())
    console.print(
        literal_line(
            f"{total} questions from {', '.join(samples)}; modes: {', '.join(config.modes)}"
        )
    )
    with err_console.status("starting the model") as status:
        outcome = evaluate(
            settings,
            config,
            samples,
            vllm_url,
            on_progress=_progress(status.update),
            on_notice=print_note,
        )
    if outcome.calibration is not None:
        _print_calibration(outcome.calibration)
    _print_summary(outcome.summaries, out)


def parse_case_examples(text: str) -> list[int]:
    """``--case-examples 0,2``: distinct whole numbers, in the order given (the first is the
    baseline the others are compared with)."""
    parts = _split([text])
    if not parts or not all(part.isdigit() for part in parts) or len(set(parts)) != len(parts):
        raise InputError(
            f"--case-examples {text!r}: expected distinct whole numbers, comma-separated (0,2)"
        )
    return [int(part) for part in parts]


def _print_calibration(stored: StoredCalibration) -> None:
    for key, found in sorted(stored.fitted.maps.items()):
        held = ", ".join(f"{k} {v:.3f}" for k, v in found.heldout_ece.items())
        console.print(
            f"calibration {key}: {found.method} on {found.fitted_on} dev answers "
            f"(held-out ECE: {held})",
            highlight=False,
        )
    for family, threshold in sorted(stored.fitted.thresholds.items()):
        console.print(f"adaptive threshold {family}: {threshold:.3f}", highlight=False)
    console.print(f"calibration file: {stored.path}", highlight=False)


def _progress(update: Callable[[str], object]) -> Progress:
    def show(benchmark: str, mode: str, done: int, total: int) -> None:
        update(f"{benchmark} {mode}: {done}/{total}")

    return show


def _print_summary(summaries: list[ModeSummary], out: Path) -> None:
    failed = 0
    for summary in summaries:
        if summary.skipped:
            skipped = f"{summary.benchmark} {summary.label}: skipped ({summary.skipped})"
            console.print(literal_line(skipped), highlight=False)
            continue
        line = (
            f"{summary.benchmark} {summary.label}: {summary.already_done + summary.done_now}/"
            f"{summary.total} done ({summary.done_now} now)"
        )
        if summary.failed:
            failed += len(summary.failed)
            first_id, first_error = summary.failed[0]
            line += f"; {len(summary.failed)} failed (first: {first_id}: {first_error})"
        if summary.not_asked:
            line += f"; {summary.not_asked} could not be asked (see the report)"
        console.print(literal_line(line), highlight=False)
    report = f"report: {out / 'report.md'}  ({out / 'report.html'}, {out / 'metrics.json'})"
    console.print(literal_line(report), highlight=False)
    if failed:
        raise NotDoneError(f"{failed} question(s) failed; run the same command again to retry them")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
