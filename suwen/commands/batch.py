"""`suwen batch`: answer every question of a folder into a resumable JSONL file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from suwen.batch import (
    Answerer,
    AnswerLog,
    BatchProgress,
    BatchSummary,
    QuestionSet,
    answer_questions,
    load_questions,
    open_answer_log,
)
from suwen.commands import answering
from suwen.commands.common import console, err_console, literal_line, print_note, settings_of
from suwen.config import Settings
from suwen.errors import InputError, InterruptedRunError, NotDoneError
from suwen.types import Mode

ERRORS_SHOWN = 20
TASKS = ("answer", "report")

TASK_HELP = (
    "answer: answer each question; report: draft a radiology report of each line's images "
    "(its question is the clinical indication), as suwen report does."
)


def batch(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Folder of images and questions."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL (appended; resumable)."),
    questions: Path | None = typer.Option(
        None, "--questions", help="Questions file (.jsonl/.csv); image paths relative to FOLDER."
    ),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        "-c",
        help="Questions answered at once, in all (default: setting, 8, per agent process).",
    ),
    processes: int | None = answering.PROCESSES_OPTION,
    plain: bool = typer.Option(False, "--plain", help="Baseline: the model alone, no retrieval."),
    adaptive: bool = answering.ADAPTIVE_OPTION,
    abstain_below: float | None = answering.ABSTAIN_BELOW_OPTION,
    task: str = typer.Option("answer", "--task", help=TASK_HELP),
    vllm_url: list[str] = answering.VLLM_URL_OPTION,
    text_index: str | None = answering.TEXT_INDEX_OPTION,
    image_index: str | None = answering.IMAGE_INDEX_OPTION,
) -> None:
    """Answer every question in FOLDER, one JSON line per question id in --out.

    FOLDER holds questions.jsonl, questions.csv, or a .txt file beside each image.
    Run the same command again to resume: answered ids are skipped, failed ones retried.
    """
    from suwen.runtime import answer_mode, answer_settings, run_async

    settings = settings_of(ctx)
    children = answering.agent_processes(settings, processes)
    # Unless given, each agent process gets the setting's number of questions in flight.
    workers = concurrency if concurrency is not None else settings.concurrency * children
    if workers < 1:
        raise InputError(f"--concurrency {workers}: must be at least 1")
    mode = answer_mode(plain, adaptive)
    if task not in TASKS or (task == "report" and adaptive):
        raise InputError(f"--task {task}: 'answer', or 'report' (with or without --plain)")
    settings = answer_settings(settings, abstain_below)
    question_set = load_questions(folder, questions, settings.max_question_chars)
    _refuse_overwriting_input(out, question_set.file)
    report = task == "report"
    run = BatchRun(settings, workers, children, mode, vllm_url, text_index, image_index, report)
    try:
        with open_answer_log(out) as log:
            summary = run_async(run.answer_all(question_set, log))
    except KeyboardInterrupt:
        raise InterruptedRunError(
            f"interrupted: every answer so far is saved in {out}; "
            "run the same command again to finish"
        ) from None
    _print_summary(summary, out)
    if not summary.complete:
        left = summary.questions - summary.skipped - summary.answered - len(summary.errors)
        raise NotDoneError(f"{left} question(s) not reached; run the same command to finish")


def _refuse_overwriting_input(out: Path, questions_file: Path | None) -> None:
    if questions_file is not None and out.exists() and out.resolve() == questions_file.resolve():
        raise InputError(f"--out {out}: is the questions file; choose another output")


@dataclass(frozen=True)
class BatchRun:
    """How the questions are answered: the settings, the model and indexes, the task."""

    settings: Settings
    concurrency: int
    processes: int
    mode: Mode
    vllm_urls: list[str]
    text_index: str | None
    image_index: str | None
    report: bool

    async def answer_all(self, questions: QuestionSet, log: AnswerLog) -> BatchSummary:
        bar = BatchBar(len(questions.items))
        return await answer_questions(
            questions,
            log,
            lambda: self._started(bar),
            concurrency=self.concurrency,
            on_progress=bar.update,
        )

    @asynccontextmanager
    async def _started(self, bar: BatchBar) -> AsyncIterator[Answerer]:
        """The agent's answerer, the progress bar shown once the model is up."""
        from suwen.runtime import AgentAnswerer

        if self.processes > 1:
            async with self._processes() as answer:
                with bar:
                    yield answer
            return
        async with answering.started_agent(
            self.settings,
            self.vllm_urls,
            text_index=self.text_index,
            image_index=self.image_index,
        ) as agent:
            with bar:
                yield AgentAnswerer(agent, self.mode, report=self.report)

    @asynccontextmanager
    async def _processes(self) -> AsyncIterator[Answerer]:
        """Agent processes answering (``suwen.answer_processes``), started under a status line."""
        from suwen.answer_processes import answering

        async with AsyncExitStack() as stack:
            with err_console.status(f"starting the model and {self.processes} agent processes"):
                answer = await stack.enter_async_context(
                    answering(
                        self.settings,
                        self.vllm_urls,
                        self.processes,
                        mode=self.mode,
                        report=self.report,
                        text_index=self.text_index,
                        image_index=self.image_index,
                        on_notice=print_note,
                    )
                )
            yield answer


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} q/s" if speed else "-- q/s", style="progress.data.speed")


class ErrorsColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        errors = int(task.fields.get("errors", 0))
        return Text(f"{errors} errors", style="red" if errors else "dim")


class BatchBar:
    """The progress bar: done/total, rate, elapsed, ETA and errors, fed by the batch callback."""

    def __init__(self, questions: int) -> None:
        self.questions = questions
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("answering"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            ErrorsColumn(),
            console=console,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> BatchBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, state: BatchProgress) -> None:
        if self.task is None:
            self.task = self.progress.add_task("batch", total=state.total, errors=0)
            if state.skipped:
                self.progress.console.print(
                    f"{state.skipped} of {self.questions} already answered; skipping them"
                )
        self.progress.update(self.task, completed=state.done, errors=state.errors)


def _print_summary(summary: BatchSummary, out: Path) -> None:
    for note in summary.notes:
        console.print(literal_line(f"note: {note}", "yellow"), highlight=False)
    table = Table(title=literal_line(f"Batch summary ({out})"), title_justify="left")
    table.add_column("")
    table.add_column("count", justify="right")
    rate = summary.answered / summary.seconds if summary.seconds > 0 else 0.0
    rows = [
        ("questions", str(summary.questions)),
        ("answered before (skipped)", str(summary.skipped)),
        ("answered now", str(summary.answered)),
        ("of which abstained (not confident enough)", str(summary.abstained)),
        ("errors (retried on the next run)", str(len(summary.errors))),
        ("seconds", f"{summary.seconds:.1f}"),
        ("answers per second", f"{rate:.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if summary.errors:
        errors = Table(title="Errors", title_justify="left")
        errors.add_column("id", no_wrap=True)
        errors.add_column("error", overflow="fold")
        for item_id, message in summary.errors[:ERRORS_SHOWN]:
            errors.add_row(literal_line(item_id), literal_line(message))
        console.print(errors)
        if len(summary.errors) > ERRORS_SHOWN:
            more = f"... and {len(summary.errors) - ERRORS_SHOWN} more in {out}"
            console.print(literal_line(more), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("batch")(batch)
