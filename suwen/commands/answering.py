"""What the answering commands (ask, report, chat, batch, demo) share: their options, declared
once, and the model start-up under a status line. Not a command itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import typer
from rich.status import Status

from suwen.commands.common import err_console, literal_line, print_note
from suwen.config import Settings
from suwen.types import AgentEvent, AgentResult, Mode, Question

if TYPE_CHECKING:
    from suwen.agent.graph import SuwenAgent

# Typer copies an option's declaration into each command that uses it.
IMAGE_OPTION = typer.Option(
    [],
    "--image",
    "-i",
    help="Image file or DICOM series folder (repeatable: prior and current study).",
)
PRIOR_OPTION = typer.Option(
    [],
    "--prior",
    help="Image of an earlier study to compare with (repeatable); --image is the current one.",
)
DATE_OPTION = typer.Option(
    [],
    "--date",
    help="Study date (YYYY-MM-DD) of the current study: one for all its images, or one each.",
)
PRIOR_DATE_OPTION = typer.Option(
    [],
    "--prior-date",
    help="Study date (YYYY-MM-DD) of the --prior(s): one for all, or one per --prior.",
)
ADAPTIVE_OPTION = typer.Option(
    False,
    "--adaptive",
    help="Answer plainly when the plain answer is confident enough, else retrieve.",
)
ABSTAIN_BELOW_OPTION = typer.Option(
    None,
    "--abstain-below",
    help="Below this confidence (0-1), say Suwen is not confident (default: setting).",
)
SLICES_OPTION = typer.Option(
    None,
    "--slices",
    help="Slices shown of a NIfTI volume or DICOM series (default: setting volume_slices).",
)
PROCESSES_OPTION = typer.Option(
    None,
    "--processes",
    "-p",
    help="Agent processes answering (default: setting, 1); one uses about one core.",
)
VLLM_URL_OPTION = typer.Option(
    [], "--vllm-url", help="Running vLLM server to use (repeatable; none: start one)."
)
TEXT_INDEX_OPTION = typer.Option(None, "--index", help="Text index (default: setting).")
IMAGE_INDEX_OPTION = typer.Option(None, "--image-index", help="Image index (default: setting).")


@asynccontextmanager
async def started_agent(
    settings: Settings,
    vllm_urls: list[str],
    *,
    text_index: str | None = None,
    image_index: str | None = None,
    sessions: bool = False,
) -> AsyncIterator[SuwenAgent]:
    """The agent, opened under a "starting the model" status line on stderr (stdout stays clean
    for ``--json``); notices (a missing index, a remote server) are printed as notes."""
    from suwen.runtime import open_agent

    async with AsyncExitStack() as stack:
        with err_console.status("starting the model"):
            agent = await stack.enter_async_context(
                open_agent(
                    settings,
                    vllm_urls,
                    text_index=text_index,
                    image_index=image_index,
                    sessions=sessions,
                    on_notice=print_note,
                )
            )
        yield agent


async def answer_question(
    settings: Settings,
    question: Question,
    vllm_urls: list[str],
    mode: Mode,
    *,
    text_index: str | None = None,
    image_index: str | None = None,
) -> AgentResult:
    """One answer, the agent's steps shown on a status line meanwhile."""
    async with started_agent(
        settings, vllm_urls, text_index=text_index, image_index=image_index
    ) as agent:
        with err_console.status("thinking") as status:
            return await agent.run(
                question, mode=mode, on_event=lambda event: show_step(status, event)
            )


def agent_processes(settings: Settings, processes: int | None) -> int:
    """``--processes`` (else the setting), refused in one line outside 1 to the maximum."""
    from suwen.config import MAX_PROCESSES
    from suwen.errors import InputError

    count = processes if processes is not None else settings.processes
    if not 1 <= count <= MAX_PROCESSES:
        raise InputError(f"--processes {count}: must be 1 to {MAX_PROCESSES}")
    return count


def show_step(status: Status, event: AgentEvent) -> None:
    """A step starting shows on the status line; the agent's notices print as notes."""
    if event.kind == "node_start" and event.message:
        status.update(literal_line(event.message))
    elif event.kind == "info" and event.message:
        print_note(event.message)
