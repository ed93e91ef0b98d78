"""`suwen config show`."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from suwen.commands.common import console, literal_line, loaded

config_app = typer.Typer(help="Inspect Suwen's settings.", no_args_is_help=True)


@config_app.command("show")
def show(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print the effective settings and where each value came from."""
    state = loaded(ctx)
    values = state.settings.model_dump(mode="json")
    values["query_encoder (derived)"] = state.settings.query_encoder
    if as_json:
        rows = {
            k: {"value": v, "source": state.origins.get(k, "derived")} for k, v in values.items()
        }
        console.print_json(
            json.dumps({"config_file": str(state.config_file or ""), "settings": rows})
        )
        return
    table = Table(title=literal_line(f"Suwen settings (file: {state.config_file or 'none'})"))
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    table.add_column("from")
    for key, value in values.items():
        shown = json.dumps(value) if not isinstance(value, str) else value
        table.add_row(key, literal_line(shown), state.origins.get(key, "derived"))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
