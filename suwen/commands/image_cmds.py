"""`suwen index images` and `suwen search image`: parse, call the image layers, render."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from suwen.commands.common import (
    console,
    err_console,
    labelled,
    literal_line,
    note_index_encoder,
    progress_bars,
    settings_of,
)
from suwen.types import ImageHit

if TYPE_CHECKING:
    from suwen.indexes import image_sources


def index_images(
    ctx: typer.Context,
    source: Path = typer.Argument(
        ...,
        help="A folder of images with sidecar .txt captions (or one study per folder with its "
        "report .txt), a JSONL/JSON/CSV manifest, or a Hugging Face dataset saved on disk "
        "(.parquet/.arrow files).",
    ),
    name: str | None = typer.Option(None, "--name", help="Index name (default: image_index)."),
    max_frames: int = typer.Option(
        3, "--max-frames", min=1, help="Frames/slices indexed per multi-frame image or volume."
    ),
    image_column: str = typer.Option("image", "--image-column", help="Dataset: image column."),
    text_column: str = typer.Option("caption", "--text-column", help="Dataset: caption column."),
    id_column: str | None = typer.Option(None, "--id-column", help="Dataset: case id column."),
    modality_column: str | None = typer.Option(
        None, "--modality-column", help="Dataset: modality column."
    ),
) -> None:
    """Add images with their captions/reports to an image index (BiomedCLIP embeddings)."""
    from suwen.indexes import image_sources
    from suwen.indexes.image_index import build_image_index

    settings = settings_of(ctx)
    index_name = name or settings.image_index
    if image_sources.is_dataset(source):
        columns = image_sources.DatasetColumns(
            image_column, text_column, id_column, modality_column
        )
        source = _extract_dataset(settings.home, source, columns)
    with _progress() as progress:
        task = progress.add_task("reading", total=None)

        def on_progress(stage: str, done: int, total: int) -> None:
            label = "found" if stage == "scan" else "embedding"
            progress.update(task, description=label, completed=done, total=total)

        def on_skip(message: str) -> None:
            progress.console.print(
                labelled("skipped: ", message, "yellow"), highlight=False, soft_wrap=True
            )

        summary = build_image_index(
            settings,
            index_name,
            source,
            progress=on_progress,
            warn=on_skip,
            max_frames=max_frames,
        )
    console.print(
        Text.assemble(
            "index ",
            literal_line(summary.name, "bold"),
            f": {summary.added} added, {summary.updated} updated, "
            f"{summary.unchanged} unchanged, {len(summary.skipped)} skipped "
            f"({summary.frames} frames embedded; now {summary.cases_total} cases, "
            f"{summary.vectors_total} vectors)",
        ),
        highlight=False,
        soft_wrap=True,
    )
    if summary.uncaptioned:
        err_console.print(
            f"[yellow]note:[/] {summary.uncaptioned} image(s) had no caption or report",
            highlight=False,
            soft_wrap=True,
        )


def _extract_dataset(home: Path, source: Path, columns: image_sources.DatasetColumns) -> Path:
    """The dataset's images written under the data home, and the manifest naming them."""
    from suwen.indexes import image_sources

    target = image_sources.extraction_dir(home, source)
    with err_console.status(f"reading {source.name}") as status:

        def on_skip(message: str) -> None:
            status.console.print(labelled("skipped: ", message, "yellow"), highlight=False)

        manifest, rows = image_sources.extract_dataset(source, target, columns, on_skip)
    err_console.print(f"{rows} rows of {escape(str(source))} written to {escape(str(target))}")
    return manifest


def search_image(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="Query image (PNG, JPEG, TIFF, DICOM, NIfTI)."),
    index: str | None = typer.Option(None, "--index", help="Image index (default: image_index)."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="Number of similar cases."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of hits."),
    exclude_self: bool = typer.Option(
        False, "--exclude-self", help="Leave out indexed copies of the query file itself."
    ),
) -> None:
    """Find indexed cases whose images look like PATH."""
    from suwen.digests import sha256_of
    from suwen.medimage import load_image
    from suwen.retrieval.images import ImageSearcher

    settings = settings_of(ctx)
    image = load_image(path)
    exclude = (sha256_of(path),) if exclude_self else ()
    note_index_encoder(settings, index or settings.image_index)
    with closing(ImageSearcher.open(settings, index)) as searcher:
        hits = searcher.search_image(image, k, exclude_sha256=exclude)
    if as_json:
        typer.echo(json.dumps([hit.as_search_json() for hit in hits], indent=2))
        return
    _print_cases(path, searcher.name, hits)


def _print_cases(path: Path, index: str, hits: list[ImageHit]) -> None:
    table = Table(title=literal_line(f"cases like {path.name} in {index}"))
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("case")
    table.add_column("caption")
    table.add_column("path", overflow="fold")
    for rank, hit in enumerate(hits, start=1):
        caption = hit.caption
        table.add_row(
            str(rank),
            f"{hit.score:.3f}",
            literal_line(hit.case_id),
            literal_line(caption if len(caption) <= 120 else caption[:117] + "..."),
            literal_line(hit.path),
        )
    console.print(table)


def _progress() -> Progress:
    return progress_bars(transient=True)


def register(index_app: typer.Typer, search_app: typer.Typer) -> None:
    index_app.command("images")(index_images)
    search_app.command("image")(search_image)
