"""`suwen report`: a draft radiology report of one study (against a prior when given)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from suwen.commands import answering
from suwen.commands.common import (
    NOT_MEDICAL_ADVICE,
    err_console,
    labelled,
    literal,
    literal_line,
    print_or_plain,
    settings_of,
)
from suwen.commands.comparison_view import comparison_table
from suwen.config import Settings
from suwen.errors import NotDoneError
from suwen.types import DraftReport, Question

REPORT_PRIOR_HELP = "Image of an earlier study to compare with (repeatable)."
DRAFT_NOTICE = "Draft for a radiologist to review and sign; " + NOT_MEDICAL_ADVICE


def report(
    ctx: typer.Context,
    image: list[Path] = typer.Argument(..., help="Image file(s) or DICOM series of the study."),
    prior: list[Path] = typer.Option([], "--prior", help=REPORT_PRIOR_HELP),
    date: list[str] = answering.DATE_OPTION,
    prior_date: list[str] = answering.PRIOR_DATE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plain: bool = typer.Option(False, "--plain", help="Baseline: no reference cases."),
    slices: int | None = answering.SLICES_OPTION,
    vllm_url: list[str] = answering.VLLM_URL_OPTION,
    text_index: str | None = answering.TEXT_INDEX_OPTION,
    image_index: str | None = answering.IMAGE_INDEX_OPTION,
) -> None:
    """Draft a structured radiology report, citing the similar cases it borrows from."""
    from suwen.agent.prompts import REPORT_TASK
    from suwen.runtime import (
        answer_settings,
        checked_images,
        checked_priors,
        command_line_dates,
        run_async,
    )

    settings = answer_settings(settings_of(ctx), None, slices)
    images = checked_images(image, settings.volume_slices)
    priors = checked_priors(prior, images, settings.volume_slices)
    dates = command_line_dates(images, date, priors, prior_date)
    request = Question(text=REPORT_TASK, images=images, prior_images=priors, image_dates=dates)
    drafted = run_async(_draft(settings, request, plain, vllm_url, text_index, image_index))
    if as_json:
        sys.stdout.write(drafted.model_dump_json(indent=2) + "\n")
    elif drafted.text.strip():
        print_or_plain(lambda: report_view(drafted), plain_report(drafted))
    if not drafted.text.strip():
        raise NotDoneError("no report: the model wrote nothing (see --json for the trace)")
    if drafted.degraded:
        raise NotDoneError("the report is incomplete: a step failed (see --json for the trace)")


async def _draft(
    settings: Settings,
    question: Question,
    plain: bool,
    urls: list[str],
    text_index: str | None,
    image_index: str | None,
) -> DraftReport:
    from suwen.agent.report import draft_report

    async with answering.started_agent(
        settings, urls, text_index=text_index, image_index=image_index
    ) as agent:
        with err_console.status("reading the study") as status:
            return await draft_report(
                agent,
                question,
                plain=plain,
                on_event=lambda event: (
                    status.update(literal_line(event.message))
                    if event.kind == "node_start" and event.message
                    else None
                ),
            )


def report_view(drafted: DraftReport) -> RenderableType:
    """Sections (Suwen's headings, the model's text literally), references, flags."""
    parts: list[RenderableType] = []
    for heading, body in (("TECHNIQUE", drafted.technique), ("COMPARISON", drafted.comparison)):
        parts.append(labelled(f"{heading}: ", body or "-", "bold"))
    parts.append(Text("FINDINGS:", "bold"))
    for row in drafted.findings:
        parts.append(labelled(f"  {row.region}: " if row.region else "  ", row.text, "cyan"))
    parts.append(Text("IMPRESSION:", "bold"))
    parts.append(literal(drafted.impression or "-"))
    changes = comparison_table(drafted.reading)
    if changes is not None:
        parts.append(changes)
    if drafted.citations:
        table = Table(title="References (other patients' cases and articles)", expand=True)
        table.add_column("#", justify="right")
        table.add_column("source")
        table.add_column("quote", ratio=1)
        for citation in drafted.citations:
            source = f"case {citation.case_id}" if citation.case_id else f"PMID {citation.pmid}"
            table.add_row(str(citation.number), literal_line(source), literal_line(citation.quote))
        parts.append(table)
    for sentence in drafted.unsupported_sentences:
        parts.append(labelled("uncited: ", sentence, "yellow"))
    if drafted.mode == "plain":
        parts.append(Text("plain mode: drafted by the model alone, without references", "dim"))
    parts.append(Text(DRAFT_NOTICE, style="dim italic"))
    return Group(*parts)


def plain_report(drafted: DraftReport) -> str:
    lines = [drafted.text, ""]
    for citation in drafted.citations:
        source = f"case {citation.case_id}" if citation.case_id else f"PMID {citation.pmid}"
        lines.append(f"[{citation.number}] {source}: {citation.quote}")
    lines += [f"uncited: {sentence}" for sentence in drafted.unsupported_sentences]
    return "\n".join([*lines, "", DRAFT_NOTICE])


def register(app: typer.Typer) -> None:
    app.command("report")(report)
