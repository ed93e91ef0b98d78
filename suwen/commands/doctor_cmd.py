"""`suwen doctor [--json]`: one table of checks, each with its fix."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from suwen.commands.common import console, settings_of
from suwen.errors import NotDoneError

STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def doctor(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Check what Suwen needs, each check with its fix; exit 1 when `suwen ask` cannot run.

    Checked: Python and packages, GPU, the vLLM build, models, indexes, the data home, disk space.
    Configured vLLM servers are checked too.
    """
    from suwen import doctor as checks_module

    checks = checks_module.run_checks(settings_of(ctx))
    if as_json:
        typer.echo(checks_module.as_json(checks))
    else:
        table = Table(title="suwen doctor")
        for column in ("check", "status", "detail", "fix"):
            table.add_column(column, overflow="fold")
        for check in checks:
            status = f"[{STYLE[check.status]}]{check.status}[/]" + (" *" if check.needed else "")
            table.add_row(escape(check.name), status, escape(check.detail), escape(check.fix))
        console.print(table)
        console.print("* needed by `suwen ask`")
    if not checks_module.ask_ready(checks):
        raise NotDoneError("something `suwen ask` needs is missing: see the fixes above")


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
