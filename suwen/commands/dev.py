"""`suwen dev ...`: build the tiny offline models the tests (and a curious user) run on."""

from __future__ import annotations

from pathlib import Path

import typer

from suwen.commands.common import console

dev_app = typer.Typer(help="Developer tools: tiny offline models for tests.", no_args_is_help=True)


@dev_app.command("tiny-clip")
def tiny_clip(
    directory: Path = typer.Argument(..., help="Directory to write the model to."),
) -> None:
    """Write a tiny random open_clip model with BiomedCLIP's kinds of towers.

    Load it with SUWEN_IMAGE_ENCODER=DIR.
    """
    from suwen.devtools.tiny_clip import write_tiny_clip

    write_tiny_clip(directory)
    console.print(f"tiny open_clip model written to {directory}")


@dev_app.command("tiny-model")
def tiny_model(
    directory: Path = typer.Argument(..., help="Directory to write the model to."),
) -> None:
    """Write a tiny random Qwen2.5-VL checkpoint (Lingshu's architecture).

    Serve it with SUWEN_VLM=DIR.
    """
    from suwen.devtools.tiny_qwen import write_tiny_model

    write_tiny_model(directory)
    console.print(f"tiny Qwen2.5-VL checkpoint written to {directory}")


def register(app: typer.Typer) -> None:
    app.add_typer(dev_app, name="dev")
