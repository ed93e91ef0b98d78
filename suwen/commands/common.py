"""What every command shares: the console, the effective settings, and one-line errors."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

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
