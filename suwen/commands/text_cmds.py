"""`suwen index text`, `suwen search text`, `suwen index list` and `suwen index info`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, cast, get_args

import typer
from rich.table import Table
from rich.text import Text

from suwen.commands.common import (
    LiveBars,
    console,
    detail_column,
    literal_line,
    note_index_encoder,
    print_errors,
    progress_bars,
    settings_of,
)
from suwen.errors import InputError, NotDoneError
from suwen.indexes import store
from suwen.types import TextMethod

if TYPE_CHECKING:
    from suwen.indexes.text_index import IngestProgress, IngestReport
    from suwen.indexes.text_sources import SourceFormat
    from suwen.types import TextHit

FORMATS = ("pubmed-xml", "pubtator", "jsonl", "pubmedqa", "pdf")


def index_text(
    ctx: typer.Context,
    sources: list[Path] = typer.Argument(
        ..., help="PubMed XML(.gz), PubTator, JSONL, PubMedQA JSON or PDF files, or folders."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Index to create or add to (default: setting text_index)."
    ),
    fmt: str | None = typer.Option(
        None, "--format", help=f"Read every source as this format: {', '.join(FORMATS)}."
    ),
) -> None:
    """Build a text index, or add sources to one (re-ingested PMIDs are updated, not doubled)."""
    from suwen.indexes.text_index import build_text_index

    settings = settings_of(ctx)
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    index_name = name or settings.text_index
    with _IngestBars() as bars:
        report = build_text_index(
            settings,
            index_name,
            sources,
            fmt=cast("SourceFormat | None", fmt),
            progress=bars.update,
        )
    _print_report(report)
    if not report.ingested_anything:
        raise NotDoneError(f"nothing could be ingested into index {index_name!r}")


class _IngestBars(LiveBars):
    """Two bars: files read, and chunks encoded (the slow part)."""

    def __init__(self) -> None:
        self.progress = progress_bars(detail_column())
        self.files = self.progress.add_task("files", total=None, detail="")
        self.chunks = self.progress.add_task("encoding", total=None, detail="")

    def update(self, event: IngestProgress) -> None:
        current = Path(event.current).name if event.current else ""
        self.progress.update(
            self.files,
            total=event.files_total,
            completed=event.files_done,
            detail=f"{current} ({event.documents} documents read)",
        )
        self.progress.update(
            self.chunks, total=max(event.chunks_total, 1), completed=event.chunks_encoded, detail=""
        )


def _print_report(report: IngestReport) -> None:
    print_errors(report.errors)
    table = Table(title=literal_line(f"ingest into {report.index!r}"))
    table.add_column("source", overflow="fold")
    table.add_column("format")
    for column in ("added", "updated", "unchanged", "deleted", "skipped"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for row in report.sources:
        status = Text("failed", "red") if row.error and not row.documents else Text("ok")
        if row.error and row.documents:
            status = Text("partly read", "yellow")
        table.add_row(
            literal_line(row.path),
            literal_line(row.format or "-"),
            *(
                str(getattr(row, f))
                for f in ("added", "updated", "unchanged", "deleted", "skipped")
            ),
            status,
        )
    console.print(table)
    console.print(
        literal_line(
            f"{report.total('added')} added, {report.total('updated')} updated, "
            f"{report.total('unchanged')} unchanged, {report.total('deleted')} deleted, "
            f"{report.total('skipped')} records and {report.files_failed} files skipped; "
            f"index {report.index!r} now holds {report.documents} documents in "
            f"{report.chunks} chunks"
        )
    )


def search_text(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="What to look for, in plain words."),
    index: str | None = typer.Option(None, "--index", help="Text index (default: text_index)."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of articles to return."),
    method: str | None = typer.Option(
        None, "--method", help="hybrid, dense or bm25 (default: the text_method setting)."
    ),
    exclude: list[str] = typer.Option([], "--exclude", help="PMID never to return (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of hits."),
) -> None:
    """Search a PubMed text index (dense + BM25 hybrid by default)."""
    from suwen.retrieval.text import TextSearcher

    settings = settings_of(ctx)
    method = method or settings.text_method
    if method not in get_args(TextMethod):
        raise InputError(f"--method {method!r}: choose hybrid, dense or bm25")
    note_index_encoder(settings, index or settings.text_index)
    with TextSearcher.open(settings, index) as searcher:
        hits = searcher.search(query, k, method=cast("TextMethod", method), exclude_pmids=exclude)
    if as_json:
        typer.echo(json.dumps([hit.as_search_json() for hit in hits], ensure_ascii=False, indent=2))
        return
    _print_hits(query, hits)


def _print_hits(query: str, hits: list[TextHit]) -> None:
    if not hits:
        console.print(literal_line(f"no hits for {query!r}"))
        return
    table = Table(title=literal_line(f"text hits for {query!r}"), show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("PMID")
    table.add_column("year")
    table.add_column("title / text", overflow="fold")
    for rank, hit in enumerate(hits, start=1):
        snippet = hit.text if len(hit.text) <= 300 else hit.text[:300] + "..."
        page = f" (page {hit.page})" if hit.page else ""
        table.add_row(
            str(rank),
            f"{hit.score:.3f}",
            literal_line(hit.pmid),
            str(hit.year or ""),
            Text.assemble(literal_line(hit.title or "", "bold"), page, "\n", literal_line(snippet)),
        )
    console.print(table)


def list_indexes(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the text and image indexes in the data home."""
    settings = settings_of(ctx)
    manifests = store.list_indexes(settings.indexes_dir)
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in manifests], indent=2))
        return
    if not manifests:
        console.print(literal_line(f"no indexes in {settings.indexes_dir}"))
        return
    table = Table(title=literal_line(f"indexes in {settings.indexes_dir}"))
    for column in ("name", "kind", "items", "vectors", "dim", "encoder", "created"):
        table.add_column(column, overflow="fold")
    for m in manifests:
        items = m.extra.get("documents", m.extra.get("cases", ""))
        cells = (m.name, m.kind, items, m.count, m.dim, m.encoder, m.created)
        table.add_row(*(literal_line(cell) for cell in cells))
    console.print(table)


def index_info(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Index name."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show what an index holds and how it was built."""
    from suwen.indexes.catalog import open_checked

    settings = settings_of(ctx)
    version, manifest = open_checked(settings.indexes_dir, name)
    if as_json:
        typer.echo(
            json.dumps({"version": str(version), **manifest.model_dump(mode="json")}, indent=2)
        )
        return
    table = Table(title=literal_line(f"index {name!r} ({manifest.kind})"), show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    table.add_row("version", str(version))
    for field, value in manifest.model_dump(mode="json", exclude={"sources", "extra"}).items():
        table.add_row(literal_line(field), literal_line("" if value is None else value))
    for field, value in manifest.extra.items():
        table.add_row(literal_line(field), literal_line(value))
    sources = Text("\n").join(literal_line(source) for source in manifest.sources)
    table.add_row("sources", sources or "-")
    console.print(table)


def register(index_app: typer.Typer, search_app: typer.Typer) -> None:
    index_app.command("text")(index_text)
    search_app.command("text")(search_text)
    index_app.command("list")(list_indexes)
    index_app.command("info")(index_info)
