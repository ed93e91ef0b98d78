"""PubMed at full scale: `suwen index pubmed-medcpt` (import NCBI's MedCPT embeddings)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from suwen.commands.common import (
    LiveBars,
    console,
    detail_column,
    literal_line,
    print_errors,
    progress_bars,
    settings_of,
)
from suwen.config import MEDCPT_ARTICLE
from suwen.errors import NotDoneError

if TYPE_CHECKING:
    from suwen.indexes.medcpt_import import ImportProgress, ImportReport


def index_pubmed_medcpt(
    ctx: typer.Context,
    directory: Path = typer.Argument(
        ...,
        help="Folder with NCBI's embeds_chunk_N.npy, pmids_chunk_N.json and pubmed_chunk_N.json.",
    ),
    name: str | None = typer.Option(
        None, "--name", help="Text index to create or add to (default: setting text_index)."
    ),
    encoder: str = typer.Option(
        MEDCPT_ARTICLE, "--encoder", help="Model that made the vectors (recorded in the index)."
    ),
    query_encoder: str | None = typer.Option(
        None, "--query-encoder", help="Model for queries (default: the encoder's query pair)."
    ),
) -> None:
    """Import NCBI's precomputed MedCPT embeddings of PubMed, chunk by chunk.

    Run the same command again to resume after an interruption.
    """
    from suwen.indexes.medcpt_import import import_medcpt

    settings = settings_of(ctx)
    index_name = name or settings.text_index
    with _ImportBars() as bars:
        report = import_medcpt(
            settings,
            directory,
            index_name,
            encoder=encoder,
            query_encoder=query_encoder,
            progress=bars.update,
        )
    _print_import(report)
    if report.up_to_date:
        done = f"index {index_name!r} already holds every chunk in {directory}"
        console.print(literal_line(done), highlight=False)
    elif not report.published:
        raise NotDoneError(f"nothing could be imported into index {index_name!r} from {directory}")


class _ImportBars(LiveBars):
    """Two bars: chunk files imported, and vectors copied."""

    def __init__(self) -> None:
        self.progress = progress_bars(detail_column())
        self.chunks = self.progress.add_task("chunks", total=None, detail="")
        self.rows = self.progress.add_task("vectors", total=None, detail="")

    def update(self, event: ImportProgress) -> None:
        self.progress.update(
            self.chunks,
            total=event.chunks_total or None,
            completed=event.chunks_done,
            detail=f"{event.stage}: {event.detail}",
        )
        self.progress.update(self.rows, total=event.rows_total or None, completed=event.rows_done)


def _print_import(report: ImportReport) -> None:
    print_errors(report.errors)
    if not report.published:
        return
    table = Table(title=literal_line(f"MedCPT import into {report.index!r}"), show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("chunks found", report.chunks_found),
        ("chunks imported now", report.chunks_imported),
        ("chunks imported before (resumed)", report.chunks_already_done),
        ("chunks skipped", len(report.errors)),
        ("articles added", report.articles_added),
        ("articles replaced (same PMID)", report.articles_replaced),
        ("vectors skipped (repeat PMID or no text)", report.rows_skipped),
        ("articles in the index", report.documents),
        ("index type", report.index_type),
        ("RAM bytes per vector", report.bytes_per_vector),
        ("recall@10 vs exact (held-out)", report.recall_at_10 or "exact"),
    ]
    for field, value in rows:
        table.add_row(field, literal_line(value))
    console.print(table)


def register(index_app: typer.Typer) -> None:
    index_app.command("pubmed-medcpt")(index_pubmed_medcpt)
