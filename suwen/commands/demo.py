"""`suwen demo`: build small indexes from the sample data and answer one question about an image."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from suwen.commands.answer_view import result_view
from suwen.commands.ask import VLLM_URL_HELP, answer_question
from suwen.commands.common import console, err_console, fail, settings_of
from suwen.config import Settings
from suwen.errors import SuwenError
from suwen.indexes import store
from suwen.types import Question


def demo(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="The shared sample-data folder."),
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
        pubmedqa, vqa_rad = prepare.sample_paths(data.expanduser().resolve())
        _ensure_text_index(settings, pubmedqa)
        _ensure_image_index(settings, vqa_rad)
        sample = prepare.demo_question(vqa_rad)
    except SuwenError as exc:
        fail(str(exc))
    console.print(
        f"[bold]Question:[/] {sample.text}  [dim](image {sample.image.name}; "
        f"VQA-RAD's answer: {sample.gold})[/]"
    )
    question = Question(text=sample.text, images=[str(sample.image)])
    result = asyncio.run(
        answer_question(settings, question, False, vllm_url, text_index=None, image_index=None)
    )
    console.print(result_view(result))


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


def _exists(settings: Settings, name: str) -> bool:
    return store.current_version(store.index_root(settings.indexes_dir, name)) is not None


def _ensure_text_index(settings: Settings, pubmedqa: Path) -> None:
    from suwen.indexes.text_index import build_text_index

    if _exists(settings, settings.text_index):
        return
    with err_console.status(f"indexing the PubMedQA abstracts in {pubmedqa.name}"):
        report = build_text_index(settings, settings.text_index, [pubmedqa])
    if not report.ingested_anything:
        fail(f"{pubmedqa}: no abstract could be indexed ({'; '.join(report.errors[:3])})")


def _ensure_image_index(settings: Settings, vqa_rad: Path) -> None:
    from suwen import demo as prepare
    from suwen.indexes.image_index import build_image_index

    if _exists(settings, settings.image_index):
        return
    with err_console.status("indexing VQA-RAD training images with their captions"):
        cases = prepare.write_case_folder(vqa_rad, settings.home / "demo" / "cases")
        build_image_index(settings, settings.image_index, cases)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
