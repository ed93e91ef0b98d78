"""What every command shares: the console, the effective settings, and one-line errors."""

from __future__ import annotations

from typing import NoReturn, Self

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from suwen.config import LoadedSettings, Settings

console = Console()
err_console = Console(stderr=True)

NOT_MEDICAL_ADVICE = (
    "Suwen is a research tool. Its answers are not medical advice; check every claim against "
    "its cited sources and a qualified clinician."
)


def loaded(ctx: typer.Context) -> LoadedSettings:
    """The settings the root callback loaded (stored on the root context)."""
    obj = ctx.find_root().obj
    assert isinstance(obj, LoadedSettings), "root callback did not run"
    return obj


def settings_of(ctx: typer.Context) -> Settings:
    return loaded(ctx).settings


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error and exit (inside a command)."""
    print_error(message)
    raise typer.Exit(code)


MAX_ERRORS_SHOWN = 20


def print_errors(messages: list[str]) -> None:
    """A job's per-input errors, one line each, the first ``MAX_ERRORS_SHOWN`` of them."""
    for message in messages[:MAX_ERRORS_SHOWN]:
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if len(messages) > MAX_ERRORS_SHOWN:
        err_console.print(f"... and {len(messages) - MAX_ERRORS_SHOWN} more errors")


def progress_bars(*extra: ProgressColumn, transient: bool = False) -> Progress:
    """The progress display of the long jobs (indexing, imports, benchmarks), on stderr so
    that stdout stays clean: description, bar, done/total, elapsed, then ``extra``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *extra,
        console=err_console,
        transient=transient,
    )


def detail_column() -> TextColumn:
    """A dim column showing each task's ``detail`` field (the file or stage at hand)."""
    return TextColumn("{task.fields[detail]}", style="dim")


class LiveBars:
    """Base of a command's progress display: ``self.progress`` shown while in the block."""

    progress: Progress

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.progress.stop()
