"""`suwen serve`: run the vision-language model on a local vLLM server until Ctrl-C."""

from __future__ import annotations

import time

import typer

from suwen.commands.common import console, settings_of

POLL_SECONDS = 1.0


def serve(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None, "--model", help="Hub id or local directory to serve (default: setting vlm)."
    ),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port (default: setting vllm_port, or a free one)."
    ),
) -> None:
    """Start vLLM's OpenAI-compatible server for the VLM and keep it up until Ctrl-C.

    Other commands use it with --vllm-url URL (several servers: repeat the option)."""
    from suwen.errors import ServerError
    from suwen.llm.server import ManagedServer

    settings = settings_of(ctx)
    # A port the user named must be that port; the configured default may move to a free one.
    server = ManagedServer(settings, model=model, port=port, strict_port=port is not None)
    try:
        with console.status(f"starting vLLM for {server.model} (log in {settings.logs_dir})"):
            server.start()
        console.print(f"vLLM serves [bold]{server.model}[/] at [bold]{server.url}/v1[/]")
        console.print(f"log: {server.log_path}   stop: Ctrl-C", highlight=False)
        while server.failure is None:
            time.sleep(POLL_SECONDS)
        raise ServerError(server.failure)
    except KeyboardInterrupt:
        console.print("stopping vLLM ...")
    finally:
        server.stop()
    console.print("vLLM stopped")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
