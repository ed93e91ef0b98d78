"""`suwen models fetch` and `suwen models list`: the real models, fetched once, then offline."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from suwen.commands.common import console, err_console, settings_of
from suwen.config import CONFIG_FILE_NAME

models_app = typer.Typer(
    help="Fetch the real models once; list what is on disk.", no_args_is_help=True
)


@models_app.command("fetch")
def fetch(
    ctx: typer.Context,
    names: list[str] = typer.Argument(
        ...,
        help="lingshu-7b, lingshu-32b, biomedclip, medcpt, or all (= 7b + biomedclip + medcpt).",
    ),
    revision: str | None = typer.Option(
        None, "--revision", help="Branch, tag or commit of the model's repository (default: main)."
    ),
) -> None:
    """Download models into the data home's models/ folder and point suwen.toml at them.

    The download resumes where it stopped and honours HF_ENDPOINT.
    Every later command then runs offline.
    """
    from suwen import models

    settings = settings_of(ctx)
    fetched = models.fetch_models(
        settings, names, revision, on_step=lambda line: err_console.print(escape(line))
    )
    for record in fetched:
        console.print(
            f"{escape(record.repo_id)} @ {record.commit[:12]}: {len(record.files)} files in "
            f"{escape(str(models.models_dir(settings) / record.folder))}"
        )
    written = models.local_settings(settings, fetched)
    config = settings.home / CONFIG_FILE_NAME
    console.print(f"set {', '.join(sorted(written))} in {escape(str(config))}")


@models_app.command("list")
def list_(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="JSON lines.")
) -> None:
    """Show the fetched models: folder, size on disk, revision and commit."""
    from suwen import models

    local = models.list_models(settings_of(ctx))
    if as_json:
        for item in local:
            row = item.record.model_dump() | {
                "path": str(item.path),
                "bytes_on_disk": item.bytes_on_disk,
                "complete": item.complete,
            }
            typer.echo(json.dumps(row))
        return
    if not local:
        err_console.print("no models fetched yet: `suwen models fetch all`")
        return
    table = Table(title="models")
    for column in ("model", "repository", "revision", "commit", "size", "complete", "path"):
        table.add_column(column)
    for item in local:
        record = item.record
        table.add_row(
            record.model,
            escape(record.repo_id),
            escape(record.revision),
            record.commit[:12],
            f"{item.bytes_on_disk / 1e6:,.1f} MB",
            "yes" if item.complete else "[red]no: fetch again[/]",
            escape(str(item.path)),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
