"""`suwen ask`: one question (with any images), one answer."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import typer
from rich.status import Status

from suwen.batch import answer_failure, question_length_error
from suwen.commands.answer_view import plain_result, result_view
from suwen.commands.common import (
    err_console,
    fail,
    literal_line,
    print_note,
    print_or_plain,
    settings_of,
)
from suwen.config import Settings
from suwen.errors import InputError
from suwen.types import AgentEvent, AgentResult, Mode, Question

IMAGE_OPTION_HELP = "Image file or DICOM series folder (repeatable: prior and current study)."
VLLM_URL_HELP = "Running vLLM server to use (repeatable; none: start one)."
ADAPTIVE_HELP = "Answer plainly when the plain answer is confident enough, else retrieve."
ABSTAIN_HELP = "Below this confidence (0-1), say Suwen is not confident (default: setting)."
PRIOR_HELP = "Image of an earlier study to compare with (repeatable); --image is the current one."
DATE_HELP = "Study date (YYYY-MM-DD) of the current study: one for all its images, or one each."
PRIOR_DATE_HELP = "Study date (YYYY-MM-DD) of the --prior(s): one for all, or one per --prior."
SLICES_HELP = "Slices shown of a NIfTI volume or DICOM series (default: setting volume_slices)."


def answer_settings(
    settings: Settings, abstain_below: float | None, slices: int | None = None
) -> Settings:
    """The settings with ``--abstain-below`` and ``--slices`` applied (validated like the
    settings themselves)."""
    if slices is not None and slices < 1:
        raise InputError(f"--slices {slices}: must be at least 1")
    if slices is not None:
        settings = settings.model_copy(update={"volume_slices": slices})
    if abstain_below is None:
        return settings
    try:
        return Settings.model_validate({**settings.model_dump(), "abstain_below": abstain_below})
    except ValueError as exc:
        raise InputError(f"--abstain-below {abstain_below}: must be between 0 and 1") from exc


def mode_of(plain: bool, adaptive: bool) -> Mode:
    if plain and adaptive:
        raise InputError("--plain and --adaptive: choose one")
    return "plain" if plain else "adaptive" if adaptive else "agent"


def checked_images(paths: list[Path], slices: int = 1) -> list[str]:
    """Decode every image given on the command line now (a volume's views too), before a model
    server is started, so a bad file costs the user a second, not a server start-up."""
    from suwen.volumes import question_views

    checked = []
    for path in paths:
        question_views(path, slices)
        checked.append(str(path.expanduser().resolve()))
    return checked


def checked_priors(paths: list[Path], images: list[str], slices: int = 1) -> list[str]:
    """``--prior`` images, checked like ``--image``; a prior needs a current study."""
    if paths and not images:
        raise InputError("--prior: give the current study with --image as well")
    return checked_images(paths, slices)


def command_line_dates(
    images: list[str], dates: list[str], priors: list[str], prior_dates: list[str]
) -> dict[str, str]:
    """``--date`` and ``--prior-date``, checked and paired with the images they date."""
    from suwen.studies import given_dates

    return {
        **given_dates(priors, prior_dates, "--prior-date", "--prior"),
        **given_dates(images, dates, "--date", "--image"),
    }


def warn(message: str) -> None:
    print_note(message)


def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question, in quotes."),
    image: list[Path] = typer.Option([], "--image", "-i", help=IMAGE_OPTION_HELP),
    prior: list[Path] = typer.Option([], "--prior", help=PRIOR_HELP),
    date: list[str] = typer.Option([], "--date", help=DATE_HELP),
    prior_date: list[str] = typer.Option([], "--prior-date", help=PRIOR_DATE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
    plain: bool = typer.Option(False, "--plain", help="Baseline: the model alone, no retrieval."),
    adaptive: bool = typer.Option(False, "--adaptive", help=ADAPTIVE_HELP),
    abstain_below: float | None = typer.Option(None, "--abstain-below", help=ABSTAIN_HELP),
    slices: int | None = typer.Option(None, "--slices", help=SLICES_HELP),
    vllm_url: list[str] = typer.Option([], "--vllm-url", help=VLLM_URL_HELP),
    text_index: str | None = typer.Option(None, "--index", help="Text index (default: setting)."),
    image_index: str | None = typer.Option(
        None, "--image-index", help="Image index (default: setting)."
    ),
) -> None:
    """Answer one question about medical images or medicine, with citations."""
    settings = settings_of(ctx)
    if not question.strip():
        fail("question: empty question")
    too_long = question_length_error(question.strip(), settings.max_question_chars, "suwen ask")
    if too_long is not None:
        fail(too_long)
    try:
        settings = answer_settings(settings, abstain_below, slices)
        images = checked_images(image, settings.volume_slices)
        priors = checked_priors(prior, images, settings.volume_slices)
        dates = command_line_dates(images, date, priors, prior_date)
        mode = mode_of(plain, adaptive)
    except InputError as exc:
        fail(str(exc))
    request = Question(text=question.strip(), images=images, prior_images=priors, image_dates=dates)
    result = asyncio.run(
        answer_question(
            settings,
            request,
            plain,
            vllm_url,
            text_index=text_index,
            image_index=image_index,
            mode=mode,
        )
    )
    failure = answer_failure(request, result)
    if as_json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    elif result.answer.strip():
        print_or_plain(lambda: result_view(result), plain_result(result))
    if failure is not None:
        # No answer (or one cut off): a script must not take it for one.
        fail(failure, code=1)


async def answer_question(
    settings: Settings,
    question: Question,
    plain: bool,
    vllm_urls: list[str],
    *,
    text_index: str | None,
    image_index: str | None,
    mode: Mode | None = None,
) -> AgentResult:
    from suwen.runtime import open_agent

    # Progress goes to stderr, so `--json` output stays clean on stdout.
    with err_console.status("starting the model") as status:
        async with open_agent(
            settings,
            vllm_urls,
            text_index=text_index,
            image_index=image_index,
            sessions=False,
            on_notice=warn,
        ) as agent:
            status.update("thinking")
            return await agent.run(
                question,
                mode=mode or ("plain" if plain else "agent"),
                on_event=lambda event: _show_step(status, event),
            )


def _show_step(status: Status, event: AgentEvent) -> None:
    if event.kind == "node_start" and event.message:
        status.update(literal_line(event.message))
    elif event.kind == "info" and event.message:
        warn(event.message)


def register(app: typer.Typer) -> None:
    app.command("ask")(ask)
