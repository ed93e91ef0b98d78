"""`suwen bench ...`: measurements that print a table and can write JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from suwen.commands.common import LiveBars, console, fail, progress_bars, settings_of

bench_app = typer.Typer(help="Benchmarks: retrieval quality (and more).", no_args_is_help=True)

DEFAULT_PARAPHRASES = Path("benchmarks/data/pubmedqa_paraphrases.json")


@bench_app.command("retrieval")
def retrieval(
    ctx: typer.Context,
    data: Path = typer.Option(
        Path("../shared/data"),
        "--data",
        envvar="SUWEN_SHARED_DATA",
        help="Shared data folder (pubmedqa/, abstracts/).",
    ),
    paraphrases: Path | None = typer.Option(
        None,
        "--paraphrases",
        help=f"Paraphrased questions JSON (default: {DEFAULT_PARAPHRASES} if present).",
    ),
    output: Path | None = typer.Option(None, "--output", help="Also write the JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Index the ~3,300 shared abstracts and score dense, BM25 and hybrid search on the 1000
    PubMedQA questions (recall@1/5/10, MRR of each question's own PMID)."""
    from suwen.commands.text_cmds import user_errors
    from suwen.retrieval.benchmark import run_retrieval_benchmark

    if not (data / "pubmedqa" / "ori_pqal.json").is_file():
        fail(f"{data}: not the shared data folder (no pubmedqa/ori_pqal.json); use --data")
    if paraphrases is None and DEFAULT_PARAPHRASES.is_file():
        paraphrases = DEFAULT_PARAPHRASES
    with user_errors(), _Bars() as bars:
        results = run_retrieval_benchmark(
            settings_of(ctx),
            data,
            paraphrases=paraphrases,
            index_progress=bars.on_index,
            query_progress=bars.on_queries,
        )
    if output is not None:
        write_json(output, results)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        print_retrieval_table(results, console)


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def print_retrieval_table(results: Mapping[str, Any], out: Console) -> None:
    from suwen.retrieval.benchmark import table_rows

    setup = results.get("setup", {})
    table = Table(
        title=(
            f"retrieval: {setup.get('queries')} PubMedQA questions over "
            f"{setup.get('documents')} abstracts ({setup.get('chunks')} chunks)"
        )
    )
    for column in ("queries", "method", "R@1", "R@5", "R@10", "MRR"):
        table.add_column(column, justify="left" if column in ("queries", "method") else "right")
    for section, method, metrics in table_rows(results):
        table.add_row(
            section,
            method,
            *(f"{metrics[key]:.3f}" for key in ("recall@1", "recall@5", "recall@10", "mrr")),
        )
    out.print(table)
    out.print(f"encoder: {setup.get('encoder')}; hybrid: {setup.get('hybrid')}")


class _Bars(LiveBars):
    """Indexing first, then one bar per query run."""

    def __init__(self) -> None:
        self.progress = progress_bars()
        self.index_task = self.progress.add_task("encoding corpus", total=None)
        self.query_tasks: dict[str, Any] = {}

    def on_index(self, event: Any) -> None:
        self.progress.update(
            self.index_task, total=max(event.chunks_total, 1), completed=event.chunks_encoded
        )

    def on_queries(self, label: str, done: int, total: int) -> None:
        if label not in self.query_tasks:
            self.query_tasks[label] = self.progress.add_task(f"queries: {label}", total=total)
        self.progress.update(self.query_tasks[label], completed=done)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
