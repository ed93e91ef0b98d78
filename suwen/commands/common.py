"""What every command shares: the console, the effective settings, one-line errors, and the
way untrusted text is printed.

Text that comes from a model, a document, a file name or a user is printed with ``literal``
(or ``literal_line``, ``safe_markdown``): as the characters it holds, never as rich markup
(``[/]``, ``[link=...]``, ``[bold red]`` print as typed), with escape sequences and control
characters removed (``suwen.sanitize.for_terminal``), and without clickable links.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Self

import typer
from rich.console import Console, RenderableType
from rich.markdown import Markdown
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.style import StyleType
from rich.text import Text

from suwen.config import LoadedSettings, Settings
from suwen.sanitize import for_terminal, line_for_terminal

log = logging.getLogger(__name__)

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


def literal(text: object, style: StyleType = "") -> Text:
    """Untrusted text, exactly as written: no markup, no escape or control characters."""
    return Text(for_terminal(str(text)), style=style)


def literal_line(text: object, style: StyleType = "") -> Text:
    """``literal`` on one line (table cells, titles, messages)."""
    return Text(line_for_terminal(str(text)), style=style)


def labelled(label: str, text: object, style: StyleType = "") -> Text:
    """``label`` (Suwen's own words) in ``style``, then untrusted ``text`` literally."""
    return Text.assemble((label, style), line_for_terminal(str(text)))


def safe_markdown(text: str) -> Markdown:
    """A model's answer as markdown (emphasis, lists, tables), with links shown as text and
    their address, never as clickable terminal hyperlinks."""
    return Markdown(for_terminal(text), hyperlinks=False)


def print_or_plain(view: Callable[[], RenderableType], plain: str) -> None:
    """Print a rendered view; if rendering fails (a bug, a terminal that cannot encode a
    character), print ``plain`` instead: what the user came for is never lost."""
    try:
        console.print(view())
    except Exception as exc:  # any renderer failure: fall back rather than lose the text
        print_note(f"could not render the output ({type(exc).__name__}); shown as plain text")
        stream = sys.stdout
        data = for_terminal(plain).rstrip("\n") + "\n"
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.write(data.encode(encoding, errors="replace").decode(encoding))
        stream.flush()


def print_note(message: str) -> None:
    err_console.print(labelled("note: ", message, "yellow"), highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    # Errors name inputs (files, indexes, servers, settings), never a question or an answer.
    log.warning("error: %s", line_for_terminal(message))
    err_console.print(labelled("error: ", message, "bold red"), highlight=False, soft_wrap=True)


MAX_ERRORS_SHOWN = 20


def print_errors(messages: list[str]) -> None:
    """A job's per-input errors, one line each, the first ``MAX_ERRORS_SHOWN`` of them."""
    for message in messages[:MAX_ERRORS_SHOWN]:
        print_error(message)
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
    """A dim column showing each task's ``detail`` field (the file or stage at hand): file
    names are shown as written, never read as markup."""
    return TextColumn("{task.fields[detail]}", style="dim", markup=False)


class LiveBars:
    """Base of a command's progress display: ``self.progress`` shown while in the block."""

    progress: Progress

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.progress.stop()


def note_index_encoder(settings: Settings, name: str) -> None:
    """Say in one line when index ``name`` is searched with its own encoder, not the default."""
    from suwen.models import encoder_notice

    message = encoder_notice(settings, name)
    if message:
        err_console.print(labelled("note: ", message, "dim"), highlight=False, soft_wrap=True)
