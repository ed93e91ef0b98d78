"""Suwen's command line: the root app, global options, and the one place errors end a command.

Commands live in ``suwen.commands.*``; each module defines its commands and registers them in
its ``register``. Heavy imports (torch, faiss, vLLM client) happen inside commands, so
``suwen --help`` stays fast. A ``SuwenError`` raised anywhere below a command is printed here as
one ``error:`` line on stderr, and the command exits with the code of its kind
(``suwen.errors.ExitCode``, listed in ``suwen --help``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

from suwen import logs, privacy
from suwen.commands.common import print_error
from suwen.config import SettingsError, load_settings, parse_assignments
from suwen.errors import EXIT_CODE_MEANINGS, ExitCode, InputError, SuwenError

if TYPE_CHECKING:
    from typer._click import Context as ClickContext  # typer's own (vendored) click

# Before any command imports a library that reads its settings once (huggingface_hub).
privacy.enforce()


def _exit_codes_epilog() -> str:
    rows = "\n".join(f"{int(code):>3}  {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items())
    return f"Exit codes:\n\n{rows}"


class SuwenGroup(TyperGroup):
    """The root command group: every error a command raises ends here, as one line."""

    def invoke(self, ctx: ClickContext) -> Any:
        try:
            return super().invoke(ctx)
        except SuwenError as exc:
            print_error(str(exc))
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


app = typer.Typer(
    name="suwen",
    cls=SuwenGroup,
    help="Suwen: a local, agentic retrieval-augmented assistant for medical images and questions.",
    epilog=_exit_codes_epilog(),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", help="Settings TOML file (default: suwen.toml in the data home)."
    ),
    home: Path | None = typer.Option(None, "--home", help="Data home (env SUWEN_HOME)."),
    assignments: list[str] = typer.Option(
        [], "--set", metavar="NAME=VALUE", help="Override any setting (repeatable)."
    ),
) -> None:
    """Settings: defaults < suwen.toml < SUWEN_* environment < flags."""
    try:
        cli_values = parse_assignments(assignments)
        if home is not None:
            cli_values["home"] = home
        ctx.obj = load_settings(config, cli_values)
    except SettingsError as exc:
        raise InputError(str(exc)) from None
    _private_home(ctx.obj.settings.home)


def _private_home(home: Path) -> None:
    """Everything Suwen writes from here on is its user's alone: umask 077 (inherited by
    every child) and a 0700 data home."""
    privacy.enforce()
    privacy.private_umask()
    try:
        privacy.private_dir(home)
    except OSError as exc:
        raise InputError(
            f"data home {home}: cannot create it readable by its owner only: {exc}"
        ) from None
    logs.configure(home)


def _register_commands(root_app: typer.Typer) -> None:
    # Imported here, after privacy.enforce(): some command modules import hub-aware libraries.
    from suwen.commands import (
        ask,
        batch,
        chat,
        config_cmd,
        data_cmd,
        demo,
        dev,
        doctor_cmd,
        eval_cmd,
        image_cmds,
        models_cmd,
        pubmed_cmds,
        report,
        serve,
        sessions_cmd,
        text_cmds,
    )

    index_app = typer.Typer(help="Build and inspect indexes.", no_args_is_help=True)
    search_app = typer.Typer(help="Search indexes from the command line.", no_args_is_help=True)
    text_cmds.register(index_app, search_app)
    image_cmds.register(index_app, search_app)
    pubmed_cmds.register(index_app)
    config_cmd.register(root_app)
    root_app.add_typer(index_app, name="index")
    root_app.add_typer(search_app, name="search")
    commands = (serve, ask, report, chat, sessions_cmd, batch, eval_cmd, dev, demo)
    for module in (*commands, models_cmd, data_cmd, doctor_cmd):
        module.register(root_app)


_register_commands(app)


def main() -> None:
    privacy.enforce()
    privacy.private_umask()
    app()
