"""`suwen index ...` and `suwen search ...`: the groups; text and image commands attach to them
from ``text_cmds`` and ``image_cmds``."""

from __future__ import annotations

import importlib

import typer

index_app = typer.Typer(help="Build and inspect indexes.", no_args_is_help=True)
search_app = typer.Typer(help="Search indexes from the command line.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    for name in ("text_cmds", "image_cmds", "pubmed_cmds"):
        try:
            importlib.import_module(f"suwen.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"suwen.commands.{name}":
                raise
    app.add_typer(index_app, name="index")
    app.add_typer(search_app, name="search")
