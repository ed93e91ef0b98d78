"""`suwen demo`: build small indexes from the sample data and answer one question about an image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from suwen.batch import answer_failure
from suwen.commands import answering
from suwen.commands.answer_view import result_view
from suwen.commands.common import console, err_console, settings_of
from suwen.errors import NotDoneError
from suwen.types import Question

OFFLINE_NOTE = (
    "[yellow]note:[/] running on offline stand-ins (tiny random Qwen2.5-VL and open_clip models, "
    "MiniLM text encoder): the answer will be noise; the pipeline is the real one. "
    "Use --real-models on a GPU machine for Lingshu-7B, BiomedCLIP and MedCPT."
)


def demo(
    ctx: typer.Context,
    data: Path | None = typer.Option(
        None,
        "--data",
        help="A folder in the sample data's layout (default: the sample data in the package).",
    ),
    offline: bool | None = typer.Option(
        None,
        "--offline/--real-models",
        help="Tiny offline stand-ins, or the real models (default: real only with a GPU).",
    ),
    vllm_url: list[str] = answering.VLLM_URL_OPTION,
) -> None:
    """Index sample abstracts and images, then answer a VQA-RAD question about an image.

    PubMedQA abstracts make the text index; VQA-RAD training images make the case index.
    The question comes from VQA-RAD's test split, so it never finds its own image.
    """
    from suwen import demo as prepare
    from suwen.runtime import run_async

    if offline is None:
        offline = not prepare.gpu_available()
    if offline:
        err_console.print(OFFLINE_NOTE)
    settings = prepare.demo_settings(settings_of(ctx), offline)
    with err_console.status("preparing the demo indexes") as status:
        sample = prepare.ensure_indexes(settings, data, on_step=status.update)
    # The question comes from a data file: literal text, never markup.
    console.print(
        f"[bold]Question:[/] {escape(sample.text)}  [dim](image {escape(sample.image.name)}; "
        f"VQA-RAD's answer: {escape(sample.gold)})[/]"
    )
    question = Question(text=sample.text, images=[str(sample.image)])
    result = run_async(answering.answer_question(settings, question, vllm_url, "agent"))
    console.print(result_view(result))
    err_console.print(
        "[dim]The demo's indexes stay in the data home: try "
        f'`suwen search text "aortic aneurysm" --index {settings.text_index}` or '
        f"`suwen search image {escape(str(sample.image))} --index {settings.image_index}`.[/]"
    )
    failure = answer_failure(question, result)
    if failure is not None:
        raise NotDoneError(failure)  # as `suwen ask`: no answer is a failure, not a result


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
