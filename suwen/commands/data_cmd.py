"""`suwen data fetch pubmed-medcpt|pubmed-baseline DIR`: PubMed from NCBI, resumable, verified."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from suwen.commands.common import console, err_console
from suwen.datafetch import BASELINE_URL, MEDCPT_URL, FetchProgress, FileResult

if TYPE_CHECKING:
    import httpx

    from suwen.datafetch import RemoteFile

data_app = typer.Typer(help="Fetch public data sets (PubMed) into a folder.", no_args_is_help=True)
fetch_app = typer.Typer(
    help="Download and verify a data set; re-run to resume.", no_args_is_help=True
)
data_app.add_typer(fetch_app, name="fetch")


class DownloadBars(FetchProgress):
    """One bar per file with bytes, rate and time left, on stderr."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
        )
        self.tasks: dict[str, TaskID] = {}

    def start(self, name: str, total: int, done: int) -> None:
        self.tasks[name] = self.progress.add_task(escape(name), total=total, completed=done)

    def advance(self, name: str, size: int) -> None:
        self.progress.advance(self.tasks[name], size)

    def finish(self, result: FileResult) -> None:
        if result.name in self.tasks:
            self.progress.remove_task(self.tasks.pop(result.name))
        checked = f"{result.size:,} bytes, {result.checked_by} checked"
        self.progress.console.print(f"{escape(result.name)}: {result.status} ({checked})")


@fetch_app.command("pubmed-medcpt")
def fetch_medcpt(
    directory: Path = typer.Argument(..., help="Folder to fill (created if needed)."),
    chunks: str | None = typer.Option(
        None, "--chunks", help="Chunk numbers A-B (default: all, 0-37)."
    ),
    base_url: str = typer.Option(MEDCPT_URL, "--base-url", help="Where the chunks are published."),
) -> None:
    """NCBI's MedCPT embeddings of PubMed (embeds, pmids and pubmed_chunk_N files).

    Import them with `suwen index pubmed-medcpt DIR`.
    """
    from suwen import datafetch

    _run(directory, lambda client: datafetch.plan_medcpt(client, base_url, chunks))


@fetch_app.command("pubmed-baseline")
def fetch_baseline(
    directory: Path = typer.Argument(..., help="Folder to fill (created if needed)."),
    files: str | None = typer.Option(
        None, "--files", help="File numbers A-B (default: all listed)."
    ),
    base_url: str = typer.Option(BASELINE_URL, "--base-url", help="The baseline's listing URL."),
) -> None:
    """The PubMed baseline (pubmedNNnNNNN.xml.gz), each file checked against its published .md5.

    Index it with `suwen index text DIR/*.xml.gz`.
    """
    from suwen import datafetch

    _run(directory, lambda client: datafetch.plan_baseline(client, base_url, files))


def _run(directory: Path, plan: Callable[[httpx.Client], list[RemoteFile]]) -> None:
    from suwen import datafetch

    folder = directory.expanduser().resolve()
    bars = DownloadBars()
    with datafetch.open_client() as client:
        with err_console.status("reading the file list"):
            remote = plan(client)
        with bars.progress:
            results = datafetch.fetch_files(client, remote, folder, bars)
    summary = ", ".join(f"{count} {status}" for status, count in datafetch.iter_statuses(results))
    total = sum(result.size for result in results)
    console.print(f"{escape(str(folder))}: {len(results)} files, {total / 1e9:.2f} GB ({summary})")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
