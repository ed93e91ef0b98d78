"""`suwen ask`: one question (with any images), one answer."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from suwen.batch import answer_failure
from suwen.commands import answering
from suwen.commands.answer_view import plain_result, result_view
from suwen.commands.common import print_or_plain, settings_of
from suwen.errors import NotDoneError
from suwen.types import Question


def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question, in quotes."),
    image: list[Path] = answering.IMAGE_OPTION,
    prior: list[Path] = answering.PRIOR_OPTION,
    date: list[str] = answering.DATE_OPTION,
    prior_date: list[str] = answering.PRIOR_DATE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
    plain: bool = typer.Option(False, "--plain", help="Baseline: the model alone, no retrieval."),
    adaptive: bool = answering.ADAPTIVE_OPTION,
    abstain_below: float | None = answering.ABSTAIN_BELOW_OPTION,
    slices: int | None = answering.SLICES_OPTION,
    vllm_url: list[str] = answering.VLLM_URL_OPTION,
    text_index: str | None = answering.TEXT_INDEX_OPTION,
    image_index: str | None = answering.IMAGE_INDEX_OPTION,
) -> None:
    """Answer one question about medical images or medicine, with citations."""
    from suwen.runtime import (
        answer_mode,
        answer_settings,
        checked_images,
        checked_priors,
        checked_question,
        command_line_dates,
        run_async,
    )

    settings = settings_of(ctx)
    text = checked_question(question, settings.max_question_chars, "suwen ask")
    settings = answer_settings(settings, abstain_below, slices)
    images = checked_images(image, settings.volume_slices)
    priors = checked_priors(prior, images, settings.volume_slices)
    dates = command_line_dates(images, date, priors, prior_date)
    mode = answer_mode(plain, adaptive)
    request = Question(text=text, images=images, prior_images=priors, image_dates=dates)
    result = run_async(
        answering.answer_question(
            settings, request, vllm_url, mode, text_index=text_index, image_index=image_index
        )
    )
    if as_json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    elif result.answer.strip():
        print_or_plain(lambda: result_view(result), plain_result(result))
    failure = answer_failure(request, result)
    if failure is not None:
        raise NotDoneError(failure)  # no answer (or one cut off): a script must not take it for one


def register(app: typer.Typer) -> None:
    app.command("ask")(ask)
