"""`suwen sessions list | delete ID | purge`: the saved conversations of the data home."""

from __future__ import annotations

import asyncio

import typer
from rich.table import Table
from rich.text import Text

from suwen.agent.sessions import Removed, delete_conversation, purge_all, saved_conversations
from suwen.commands.common import console, literal_line, settings_of
from suwen.config import Settings
from suwen.errors import NotDoneError

sessions_app = typer.Typer(
    help="List and delete saved chat conversations (and the transcripts /save wrote).",
    no_args_is_help=True,
)


@sessions_app.command("list")
def list_sessions(ctx: typer.Context) -> None:
    """List saved conversations, most recently active first."""
    settings = settings_of(ctx)
    conversations = asyncio.run(saved_conversations(settings))
    if not conversations:
        console.print(Text(f"no saved conversations in {settings.sessions_db}"))
        return
    table = Table(title="Saved conversations (newest first)", title_justify="left")
    for column in ("id", "last active", "turns", "first question", "transcripts"):
        table.add_column(column, overflow="fold")
    for item in conversations:
        when = item.last_active.astimezone().strftime("%Y-%m-%d %H:%M") if item.last_active else ""
        table.add_row(
            literal_line(item.thread_id),
            when,
            str(item.turns),
            literal_line(item.first_question),  # the user's words: literal text, never markup
            Text("\n").join(literal_line(path) for path in item.transcripts),
        )
    console.print(table)


@sessions_app.command("delete")
def delete(
    ctx: typer.Context,
    thread_id: str = typer.Argument(..., metavar="ID", help="The conversation's id (see list)."),
) -> None:
    """Delete one conversation: its checkpoints and the transcripts /save wrote of it."""
    settings = settings_of(ctx)
    removed = asyncio.run(delete_conversation(settings, thread_id))
    _report(removed, settings)


@sessions_app.command("purge")
def purge(
    ctx: typer.Context,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete every saved conversation, every transcript /save wrote, and chat's input history."""
    settings = settings_of(ctx)
    if not yes and not typer.confirm("Delete every saved conversation?", default=False):
        raise NotDoneError("purge not confirmed: nothing was deleted")
    removed = asyncio.run(purge_all(settings))
    _report(removed, settings)


def _report(removed: Removed, settings: Settings) -> None:
    count = len(removed.conversations)
    console.print(Text(f"deleted {count} conversation{'s' if count != 1 else ''}"))
    for path in removed.transcripts:
        console.print(Text(f"deleted transcript {path}"))
    for path in removed.kept:
        console.print(Text(f"kept transcript {path}: changed since Suwen wrote it"))
    if removed.input_history is not None:
        console.print(Text(f"deleted chat input history {removed.input_history}"))
    if not removed.compacted:
        console.print(
            Text(
                f"note: another Suwen process has {settings.sessions_db} open; the deleted text "
                "is overwritten on disk when that process closes it"
            )
        )


def register(app: typer.Typer) -> None:
    app.add_typer(sessions_app, name="sessions")
