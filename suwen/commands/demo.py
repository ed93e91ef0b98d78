"""`suwen demo`: build small indexes from the sample data and answer one question about an image."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.markup import escape

from suwen.batch import answer_failure
from suwen.commands.answer_view import result_view
from suwen.commands.ask import VLLM_URL_HELP, answer_question
from suwen.commands.common import console, err_console, fail, settings_of
from suwen.config import Settings
from suwen.errors import SuwenError
from suwen.types import Question


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
    vllm_url: list[str] = typer.Option([], "--vllm-url", help=VLLM_URL_HELP),
) -> None:
    """Index sample PubMed abstracts and VQA-RAD training images, then answer a VQA-RAD test
    question about its image, with citations."""
    from suwen import demo as prepare

    try:
        settings = _demo_settings(settings_of(ctx), offline)
        folder = prepare.bundled_sample_data() if data is None else data.expanduser().resolve()
        with err_console.status("preparing the demo indexes") as status:
            sample = prepare.ensure_indexes(settings, folder, on_step=status.update)
    except SuwenError as exc:
        fail(str(exc))
    # The question comes from a data file: literal text, never markup.
    console.print(
        f"[bold]Question:[/] {escape(sample.text)}  [dim](image {escape(sample.image.name)}; "
        f"VQA-RAD's answer: {escape(sample.gold)})[/]"
    )
    question = Question(text=sample.text, images=[str(sample.image)])
    result = asyncio.run(
        answer_question(settings, question, False, vllm_url, text_index=None, image_index=None)
    )
    console.print(result_view(result))
    failure = answer_failure(question, result)
    err_console.print(
        "[dim]The demo's indexes stay in the data home: try "
        f'`suwen search text "aortic aneurysm" --index {settings.text_index}` or '
        f"`suwen search image {escape(str(sample.image))} --index {settings.image_index}`.[/]"
    )
    if failure is not None:
        fail(failure, code=1)  # as `suwen ask`: no answer is a failure, not a result


def _demo_settings(settings: Settings, offline: bool | None) -> Settings:
    from suwen import demo as prepare

    if offline is None:
        offline = not prepare.gpu_available()
    if offline:
        err_console.print(
            "[yellow]note:[/] running on offline stand-ins (tiny random Qwen2.5-VL and open_clip "
            "models, MiniLM text encoder): the answer will be noise; the pipeline is the real one. "
            "Use --real-models on a GPU machine for Lingshu-7B, BiomedCLIP and MedCPT."
        )
        settings = prepare.offline_settings(settings, settings.home / "demo" / "models")
    return settings.model_copy(
        update={"text_index": prepare.TEXT_INDEX, "image_index": prepare.IMAGE_INDEX}
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
