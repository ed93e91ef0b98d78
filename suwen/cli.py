"""Suwen's command line: the root app, global options, and one-line errors.

Commands live in ``suwen.commands.*``; each registers itself here. Heavy imports (torch, faiss,
vLLM client) happen inside commands, so ``suwen --help`` stays fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from suwen import logs, privacy
from suwen.commands.common import fail, print_error
from suwen.config import SettingsError, load_settings, parse_assignments
from suwen.errors import SuwenError

# Before any command imports a library that reads its settings once (huggingface_hub).
privacy.enforce()

app = typer.Typer(
    name="suwen",
    help="Suwen: a local, agentic retrieval-augmented assistant for medical images and questions.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = (
    "config_cmd",
    "index",
    "search",
    "serve",
    "ask",
    "report",
    "chat",
    "sessions_cmd",
    "batch",
    "eval_cmd",
    "dev",
    "demo",
    "models_cmd",
    "data_cmd",
    "doctor_cmd",
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
        fail(str(exc))
    _private_home(ctx.obj.settings.home)


def _private_home(home: Path) -> None:
    """Everything Suwen writes from here on is its user's alone: umask 077 (inherited by
    every child) and a 0700 data home."""
    privacy.enforce()
    privacy.private_umask()
    try:
        privacy.private_dir(home)
    except OSError as exc:
        fail(f"data home {home}: cannot create it readable by its owner only: {exc}")
    logs.configure(home)


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"suwen.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"suwen.commands.{name}":
                continue  # not built yet
            raise
        module.register(app)


_register_commands()


def main() -> None:
    # Outside typer's own handling, errors are printed here and become exit codes directly.
    privacy.enforce()
    privacy.private_umask()
    try:
        app()
    except SuwenError as exc:
        print_error(str(exc))
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print_error("interrupted")
        raise SystemExit(130) from None
