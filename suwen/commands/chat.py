"""`suwen chat`: an interactive conversation about medical images and medicine.

Line editing, history and file-path completion come from prompt_toolkit; the answer streams in
as markdown (rich) under the steps the agent is taking. Ctrl-C while an answer is being written
cancels that answer and keeps the chat; Ctrl-C at the prompt clears the line; Ctrl-D leaves.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import typer
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from suwen.agent.sessions import conversation_exists, input_history_file, saved_conversations
from suwen.agent.state import Turn
from suwen.batch import question_length_error
from suwen.chat_session import ChatSession, new_thread_id
from suwen.commands import answering
from suwen.commands.answer_view import (
    answer_view,
    evidence_detail,
    evidence_table,
    notice,
    numbered_evidence,
    plain_result,
    transcript_markdown,
)
from suwen.commands.common import (
    console,
    labelled,
    literal_line,
    print_note,
    print_or_plain,
    safe_markdown,
    settings_of,
)
from suwen.config import Settings
from suwen.errors import InputError, SuwenError
from suwen.types import AgentEvent, AgentResult

COMMANDS: dict[str, str] = {
    "/image": "PATH   attach an image (PATH --date YYYY-MM-DD: its study date); alone: list them",
    "/prior": "PATH   attach an earlier study to compare the /image with (--date as for /image)",
    "/evidence": "N    show evidence item N of the last answer in full",
    "/plain": "        toggle plain mode (the model alone, no retrieval: the baseline)",
    "/adaptive": "     toggle adaptive mode (retrieve only when the plain answer is unsure)",
    "/save": "FILE    write this conversation as markdown, with its citations",
    "/new": "         start a new conversation",
    "/sessions": "    list saved conversations (continue one with --resume THREAD)",
    "/help": "        this list",
    "/quit": "        leave (Ctrl-D too)",
}


def chat(
    ctx: typer.Context,
    image: list[Path] = answering.IMAGE_OPTION,
    prior: list[Path] = answering.PRIOR_OPTION,
    date: list[str] = answering.DATE_OPTION,
    prior_date: list[str] = answering.PRIOR_DATE_OPTION,
    resume: str | None = typer.Option(None, "--resume", help="Continue a saved conversation."),
    plain: bool = typer.Option(False, "--plain", help="Start in plain mode (no retrieval)."),
    adaptive: bool = answering.ADAPTIVE_OPTION,
    abstain_below: float | None = answering.ABSTAIN_BELOW_OPTION,
    vllm_url: list[str] = answering.VLLM_URL_OPTION,
    text_index: str | None = answering.TEXT_INDEX_OPTION,
    image_index: str | None = answering.IMAGE_INDEX_OPTION,
) -> None:
    """Talk with Suwen about images and medical questions; /help inside lists the commands."""
    from suwen.runtime import (
        answer_mode,
        answer_settings,
        checked_images,
        command_line_dates,
        run_async,
    )

    settings = settings_of(ctx)
    images = checked_images(image)
    priors = checked_images(prior)  # may wait for an /image (the current study)
    dates = command_line_dates(images, date, priors, prior_date)
    answer_mode(plain, adaptive)  # refuses both
    settings = answer_settings(settings, abstain_below)
    if resume is not None and not asyncio.run(conversation_exists(settings, resume)):
        raise InputError(
            f"--resume {resume}: no saved conversation with that id in "
            f"{settings.sessions_db} (list them with /sessions)"
        )
    options = ChatOptions(
        images, resume, plain, vllm_url, text_index, image_index, adaptive, priors, dates
    )
    run_async(_chat(settings, options))


@dataclass(frozen=True)
class ChatOptions:
    images: list[str]
    resume: str | None
    plain: bool
    vllm_urls: list[str]
    text_index: str | None
    image_index: str | None
    adaptive: bool = False
    priors: list[str] = field(default_factory=list)
    dates: dict[str, str] = field(default_factory=dict)  # --date / --prior-date per path


async def _chat(settings: Settings, options: ChatOptions) -> None:
    console.print(Text("Suwen chat", style="bold"), Text("-- /help lists the commands", "dim"))
    console.print(notice())
    async with answering.started_agent(
        settings,
        options.vllm_urls,
        text_index=options.text_index,
        image_index=options.image_index,
        sessions=True,
    ) as agent:
        session = ChatSession(agent, thread_id=options.resume or new_thread_id())
        session.plain = options.plain
        session.adaptive = options.adaptive
        earlier = await session.start(
            options.images,
            options.priors,
            options.dates,
            resume=options.resume,
            on_notice=print_note,
        )
        screen = ChatScreen(settings, session, earlier)
        await screen.run()


def input_history(settings: Settings) -> History:
    """What the prompt remembers of the lines typed (arrow-up recall): this sitting only, unless
    the setting ``chat_history`` keeps them in the data home (``input_history_file``)."""
    path = input_history_file(settings)
    return InMemoryHistory() if path is None else FileHistory(str(path))


class ChatScreen:
    """The read-answer loop and the slash commands."""

    def __init__(self, settings: Settings, session: ChatSession, earlier: list[Turn]) -> None:
        self.settings = settings
        self.session = session
        self.earlier = earlier  # turns of a resumed conversation, from the session store
        self.prompt: PromptSession[str] = PromptSession(
            history=input_history(settings),
            completer=ChatCompleter(),
            complete_while_typing=False,
        )

    async def run(self) -> None:
        self._greet()
        while True:
            try:
                line = (await self.prompt.prompt_async(self._prompt_text())).strip()
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt: a fresh line
            except EOFError:
                break  # Ctrl-D
            if not line:
                continue
            if line.startswith("/"):
                try:
                    if not await self.command(line):
                        break
                except SuwenError as exc:
                    console.print(labelled("error: ", exc, "red"), highlight=False)
                continue
            await self.answer(line)
        self._farewell()

    def _prompt_text(self) -> str:
        tags = []
        if self.session.plain:
            tags.append("plain")
        if self.session.adaptive:
            tags.append("adaptive")
        if self.session.images:
            tags.append(f"{len(self.session.images)} image(s)")
        return f"suwen[{', '.join(tags)}]> " if tags else "suwen> "

    def _greet(self) -> None:
        console.print(literal_line(f"conversation {self.session.thread_id}", "dim"))
        if self.earlier:
            console.print(f"resumed: {len(self.earlier)} earlier turn(s); the last:", style="dim")
            last = self.earlier[-1]
            console.print(labelled("you: ", last.question, "bold"))
            console.print(safe_markdown(last.answer))
        for path in self.session.images:
            console.print(literal_line(f"attached {path}", "dim"))

    def _farewell(self) -> None:
        if self.session.turns or self.earlier:
            resume = f"saved; continue with: suwen chat --resume {self.session.thread_id}"
            console.print(literal_line(resume, "dim"), highlight=False)

    # --- answering ---------------------------------------------------------------------------

    async def answer(self, text: str) -> None:
        too_long = question_length_error(text, self.settings.max_question_chars, "chat")
        if too_long is not None:
            console.print(labelled("error: ", too_long, "red"), highlight=False)
            return
        view = AnswerStream()
        task = asyncio.create_task(self.session.ask(text, on_event=view.on_event))
        loop = asyncio.get_running_loop()
        interrupted = False

        def cancel_answer() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        # While an answer is written the terminal is in normal mode, so Ctrl-C arrives as
        # SIGINT: it cancels this answer only (its model requests are cancelled with it).
        loop.add_signal_handler(signal.SIGINT, cancel_answer)
        try:
            with Live(view, console=console, refresh_per_second=8, transient=True):
                result = await task
        except asyncio.CancelledError:
            if not interrupted:
                raise
            console.print(
                Text.assemble(("answer cancelled", "yellow"), " -- ask again, or /help"),
                highlight=False,
            )
            return
        except SuwenError as exc:
            console.print(labelled("error: ", exc, "red"), highlight=False)
            return
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        print_or_plain(lambda: self._answer_view(result), plain_result(result))

    def _answer_view(self, result: AgentResult) -> RenderableType:
        parts: list[RenderableType] = [answer_view(result)]
        entries = numbered_evidence(result)
        if entries:
            parts.append(evidence_table(entries))
        if result.mode == "plain":
            parts.append(Text("plain mode: the model alone, without retrieval", style="dim"))
        parts.append(notice())
        return Group(*parts)

    # --- commands ----------------------------------------------------------------------------

    async def command(self, line: str) -> bool:
        """Run one slash command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        handlers = {
            "/image": self._image,
            "/prior": self._prior,
            "/evidence": self._evidence,
            "/plain": self._plain,
            "/adaptive": self._adaptive,
            "/save": self._save,
            "/new": self._new,
            "/help": self._help,
        }
        if name == "/sessions":
            await self._sessions()
        elif name in handlers:
            handlers[name](arg)
        else:
            console.print(literal_line(f"unknown command {name}; /help lists them", "yellow"))
        return True

    def _image(self, arg: str) -> None:
        if not arg:
            if not self.session.images:
                console.print("no image attached; /image PATH attaches one")
            for number, path in enumerate(self.session.images, start=1):
                console.print(literal_line(f"{number}. {path}"), highlight=False)
            return
        path = self.session.attach(arg)
        count = len(self.session.images)
        message = f"attached {path} ({count} image(s) in this conversation)"
        console.print(literal_line(message), highlight=False)

    def _prior(self, arg: str) -> None:
        path = self.session.attach_prior(arg)
        message = f"attached prior study {path} ({len(self.session.priors)} prior(s))"
        console.print(literal_line(message), highlight=False)

    def _evidence(self, arg: str) -> None:
        last = self.session.last
        if last is None:
            raise InputError("/evidence: no answer yet")
        entries = {entry.number: entry for entry in numbered_evidence(last)}
        if not entries:
            raise InputError("/evidence: the last answer has no evidence")
        if not arg.isdigit() or int(arg) not in entries:
            raise InputError(f"/evidence N: N is one of {', '.join(map(str, sorted(entries)))}")
        console.print(evidence_detail(entries[int(arg)]))

    def _plain(self, arg: str) -> None:
        plain = self.session.toggle_plain()
        state = "on: the model alone, no retrieval" if plain else "off: the full agent"
        console.print(f"plain mode {state}")

    def _adaptive(self, arg: str) -> None:
        adaptive = self.session.toggle_adaptive()
        state = (
            "on: plain answer first, retrieval only when it is unsure"
            if adaptive
            else "off: the full agent"
        )
        console.print(f"adaptive mode {state}")

    def _save(self, arg: str) -> None:
        if not arg:
            raise InputError("/save needs a file name, e.g. /save chat.md")
        text = transcript_markdown(self.session.thread_id, self.earlier, self.session.turns)
        path = self.session.save_transcript(Path(arg), text, self.settings.sessions_db)
        console.print(literal_line(f"saved the conversation to {path}"), highlight=False)

    def _new(self, arg: str) -> None:
        thread = self.session.new_thread()
        self.earlier = []
        console.print(literal_line(f"new conversation {thread}", "dim"))

    def _help(self, arg: str) -> None:
        table = Table.grid(padding=(0, 2))
        for name, text in COMMANDS.items():
            table.add_row(name, text.strip())
        console.print(table)
        console.print("Ctrl-C cancels an answer being written; Ctrl-D leaves.", style="dim")

    async def _sessions(self) -> None:
        threads = (await saved_conversations(self.settings))[:20]
        if not threads:
            console.print("no saved conversations yet")
            return
        table = Table(title="Saved conversations (newest first)", title_justify="left")
        for column in ("thread", "last active", "turns", "first question"):
            table.add_column(column, overflow="fold")
        for thread in threads:
            turns = await self.session.history(thread.thread_id)
            first = turns[0].question if turns else ""
            mark = " (this one)" if thread.thread_id == self.session.thread_id else ""
            when = thread.last_active.strftime("%Y-%m-%d %H:%M") if thread.last_active else ""
            table.add_row(
                literal_line(thread.thread_id + mark), when, str(len(turns)), literal_line(first)
            )
        console.print(table)


class AnswerStream:
    """What the screen shows while the agent works: its steps, then the answer as it streams.

    Only the answer's last lines are drawn (a live region taller than the terminal cannot be
    redrawn); the whole answer is printed once it is complete.
    """

    def __init__(self) -> None:
        self.started: dict[str, str] = {}
        self.steps: dict[str, Text] = {}
        self.notes: list[Text] = []
        self.text = ""

    def on_event(self, event: AgentEvent) -> None:
        if event.kind == "token":
            self.text += event.token
        elif event.kind == "node_start":
            self.started[event.node] = event.message
            self.steps[event.node] = literal_line(f"… {event.message}", "cyan")
        elif event.kind == "node_end":
            began = self.started.get(event.node, event.node)
            self.steps[event.node] = literal_line(f"✓ {began} -- {event.message}", "dim")
        elif event.kind == "info" and event.message:
            self.notes.append(literal_line(f"! {event.message}", "yellow"))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        status = [*self.steps.values(), *self.notes]
        yield from status
        if not self.text:
            return
        answer = safe_markdown(self.text)
        lines = console.render_lines(answer, options.update(height=None), pad=False)
        room = max(3, (options.max_height or 24) - len(status) - 1)
        for line in lines[-room:]:
            yield from line
            yield Segment.line()


class ChatCompleter(Completer):
    """Slash commands by name, then file paths after /image and /save."""

    def __init__(self) -> None:
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if text.startswith(("/image ", "/save ")):
            argument = text.partition(" ")[2].lstrip()
            yield from self.paths.get_completions(Document(argument, len(argument)), event)
        elif text.startswith("/") and " " not in text:
            yield from _matching(text, COMMANDS)


def _matching(prefix: str, names: Iterable[str]) -> Iterator[Completion]:
    for name in names:
        if name.startswith(prefix):
            yield Completion(name, start_position=-len(prefix))


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
