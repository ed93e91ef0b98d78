"""Assembles what ask, chat, batch and eval need: a model, the searchers whose indexes exist,
the session store, and the agent on top, all closed again on the way out.

``Backends`` names how each part is opened. Commands use the real ones (a vLLM server, started
when no URL is given, and the FAISS/SQLite searchers); tests pass their own, either as the
``backends`` argument or, for a CLI started in another process, through ``install_backends``
in a test-only entry module. No setting or environment variable can swap in a fake model.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from suwen import privacy
from suwen.config import Settings
from suwen.errors import IndexMissingError, InputError
from suwen.llm.base import VisionLanguageModel
from suwen.models import encoder_notice
from suwen.tools.cases import ImageSearch
from suwen.tools.pubmed import TextSearch

if TYPE_CHECKING:
    from suwen.agent.graph import SuwenAgent
    from suwen.types import AgentResult, Mode, Question

T = TypeVar("T")
Managed = AbstractContextManager[T] | AbstractAsyncContextManager[T]
ModelOpener = Callable[[Settings, Sequence[str]], Managed[VisionLanguageModel]]
TextOpener = Callable[[Settings, str], Managed[TextSearch]]
ImageOpener = Callable[[Settings, str], Managed[ImageSearch]]
Notice = Callable[[str], None]


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop, as ``asyncio.run`` does (Ctrl-C cancels
    it and raises ``KeyboardInterrupt``; the loop is closed after): uvloop's loop where uvloop
    is installed (Linux and macOS), asyncio's own otherwise. One process drives every model
    call of a batch or evaluation from one thread, and uvloop's sockets, callbacks and timers
    cost that thread less CPU per request than asyncio's (benchmarks/coordinator.py).
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _open_vllm(settings: Settings, urls: Sequence[str]) -> Managed[VisionLanguageModel]:
    from suwen.llm.server import open_model

    return open_model(settings, list(urls))


def _open_text(settings: Settings, name: str) -> Managed[TextSearch]:
    from suwen.retrieval.text import TextSearcher

    return _Closing(TextSearcher.open(settings, name))


def _open_images(settings: Settings, name: str) -> Managed[ImageSearch]:
    from suwen.retrieval.images import ImageSearcher

    return _Closing(ImageSearcher.open(settings, name))


@dataclass(frozen=True)
class Backends:
    """How the model and the two searchers are opened (each a context manager)."""

    open_model: ModelOpener = _open_vllm
    open_text: TextOpener = _open_text
    open_images: ImageOpener = _open_images


_installed = Backends()


def install_backends(backends: Backends) -> Backends:
    """Make ``backends`` the default for every later ``open_agent``; returns the previous one.
    For tests that start the CLI as a separate process (see tests/fake_cli.py)."""
    global _installed
    previous, _installed = _installed, backends
    return previous


def current_backends() -> Backends:
    return _installed


@asynccontextmanager
async def open_agent(
    settings: Settings,
    vllm_urls: Sequence[str] = (),
    *,
    text_index: str | None = None,
    image_index: str | None = None,
    sessions: bool = True,
    backends: Backends | None = None,
    on_notice: Notice | None = None,
) -> AsyncIterator[SuwenAgent]:
    """A ready agent: model (``vllm_urls``, else ``settings.vllm_url``, else a managed server),
    the text and image searchers whose indexes exist (a missing index is reported through
    ``on_notice`` and its tool left out), and, with ``sessions``, the conversation store."""
    from suwen.agent.graph import SuwenAgent
    from suwen.agent.sessions import open_sessions

    parts = backends or _installed
    notice = on_notice or (lambda message: None)
    urls = list(vllm_urls) or list(settings.vllm_url)
    # Library users get the same guarantees as the CLI: offline, untraced, a private home,
    # and model requests only to this machine unless a setting says otherwise.
    privacy.enforce()
    privacy.private_dir(settings.home)
    remote = privacy.check_vllm_urls(urls, settings.allow_remote_vllm)
    if remote:
        notice(remote)
    async with AsyncExitStack() as stack:
        text_name = text_index or settings.text_index
        image_name = image_index or settings.image_index
        for name in (text_name, image_name):  # an index searched with its own encoder says so
            _say(notice, encoder_notice(settings, name))
        text = await _optional(stack, lambda: parts.open_text(settings, text_name), notice, "text")
        images = await _optional(
            stack, lambda: parts.open_images(settings, image_name), notice, "image"
        )
        model = await _enter(stack, parts.open_model(settings, urls))
        checkpointer = (
            await stack.enter_async_context(open_sessions(settings)) if sessions else None
        )
        stack.enter_context(_loaded_objects_frozen())
        yield SuwenAgent(settings, model, text, images, checkpointer=checkpointer)


_frozen_by = 0  # open agents that froze what was loaded
_thresholds_before: tuple[int, int, int] | None = None  # the collector's, restored at the end
_freeze_lock = threading.Lock()
# The cyclic collector's thresholds while an agent is open: a young collection every 20,000
# new container objects instead of 700 (an agent question makes tens of thousands, nearly all
# freed by reference counting long before a collection would look at them).
AGENT_GC_THRESHOLDS = (20_000, 20, 20)


@contextmanager
def _loaded_objects_frozen() -> Iterator[None]:
    """Keep what is loaded by now (libraries, encoders, indexes: hundreds of thousands of
    objects once PyTorch is imported) out of the cyclic garbage collector's full collections
    while an agent is open: they live as long as it does, and walking them all again every
    few hundred model calls cost a tenth of the coordinator's CPU. Collections also run less
    often meanwhile (``AGENT_GC_THRESHOLDS``). The last agent to close hands the objects
    back to the collector and restores its thresholds."""
    global _frozen_by, _thresholds_before
    with _freeze_lock:
        gc.freeze()
        if _frozen_by == 0:
            _thresholds_before = gc.get_threshold()
            gc.set_threshold(*AGENT_GC_THRESHOLDS)
        _frozen_by += 1
    try:
        yield
    finally:
        with _freeze_lock:
            _frozen_by -= 1
            if _frozen_by == 0:
                gc.unfreeze()
                if _thresholds_before is not None:
                    gc.set_threshold(*_thresholds_before)
                    _thresholds_before = None


def _say(notice: Notice, message: str | None) -> None:
    if message:
        notice(message)


async def _optional(
    stack: AsyncExitStack, open_one: Callable[[], Managed[T]], notice: Notice, kind: str
) -> T | None:
    """Open a searcher; a missing index means answering without that tool, said once."""
    try:
        # Opening reads the index and loads its encoder: slow, synchronous work.
        return await _enter(stack, await asyncio.to_thread(open_one))
    except IndexMissingError as exc:
        tool = "PubMed search" if kind == "text" else "similar-case search"
        notice(f"{exc} -- answering without {tool}")
        return None


async def _enter(stack: AsyncExitStack, opening: Managed[T]) -> T:
    if isinstance(opening, AbstractAsyncContextManager):
        return await stack.enter_async_context(opening)
    # A synchronous opener may block for a while (loading an encoder): keep the loop free.
    return await asyncio.to_thread(stack.enter_context, opening)


class _Closing(AbstractContextManager[T]):
    """Context manager around an opened searcher, closing it on exit when it can be closed."""

    def __init__(self, searcher: T) -> None:
        self.searcher = searcher

    def __enter__(self) -> T:
        return self.searcher

    def __exit__(self, *exc: object) -> None:
        close = getattr(self.searcher, "close", None)
        if callable(close):
            close()


class AgentAnswerer:
    """What batch and eval ask of each question, on top of ``SuwenAgent`` (no session thread):
    the answer in ``mode``, or a draft report as ``suwen report`` drafts it, for a report
    question or, with ``report``, for every question (its text is the clinical indication).
    Both decode every image first and refuse an unreadable one in one line, so batch does not
    decode the images a second time to check them (``suwen.batch.ReadsImages``)."""

    reads_images: Literal[True] = True

    def __init__(self, agent: SuwenAgent, mode: Mode = "agent", *, report: bool = False) -> None:
        self.agent = agent
        self.mode = mode
        self.report = report

    async def __call__(self, question: Question) -> AgentResult:
        if self.report or question.answer_format.kind == "report":
            # Adaptive mode has no report route of its own: it drafts as the agent does.
            from suwen.agent.report import as_agent_result, draft_report

            drafted = await draft_report(self.agent, question, plain=self.mode == "plain")
            return as_agent_result(drafted, question)
        return await self.agent.run(question, mode=self.mode)


class ExampleVariants:
    """The eval runner's ``ExampleAnswerers``: the same agent (model, indexes) showing another
    number of case examples, one agent per count, made when first asked for."""

    def __init__(self, agent: SuwenAgent) -> None:
        self.agent = agent
        self.made: dict[int, SuwenAgent] = {}

    def __call__(self, mode: Mode, count: int) -> AgentAnswerer | None:
        if mode == "plain":
            return None
        if count not in self.made:
            from suwen.agent.graph import SuwenAgent

            nodes = self.agent.nodes
            settings = self.agent.settings.model_copy(update={"case_examples": count})
            self.made[count] = SuwenAgent(
                settings, nodes.model, nodes.text_search, nodes.image_search
            )
        return AgentAnswerer(self.made[count], mode)


# -- what ask, report, chat and batch check before a model server is started ------------------


def checked_question(text: str, max_chars: int, where: str) -> str:
    """The question without surrounding blanks; an empty or too long one is refused."""
    from suwen.batch import question_length_error

    question = text.strip()
    if not question:
        raise InputError("question: empty question")
    too_long = question_length_error(question, max_chars, where)
    if too_long is not None:
        raise InputError(too_long)
    return question


def answer_settings(
    settings: Settings, abstain_below: float | None, slices: int | None = None
) -> Settings:
    """The settings with ``--abstain-below`` and ``--slices`` applied (validated like the
    settings themselves)."""
    if slices is not None and slices < 1:
        raise InputError(f"--slices {slices}: must be at least 1")
    if slices is not None:
        settings = settings.model_copy(update={"volume_slices": slices})
    if abstain_below is None:
        return settings
    try:
        return Settings.model_validate({**settings.model_dump(), "abstain_below": abstain_below})
    except ValueError as exc:
        raise InputError(f"--abstain-below {abstain_below}: must be between 0 and 1") from exc


def answer_mode(plain: bool, adaptive: bool) -> Mode:
    """The mode the ``--plain`` and ``--adaptive`` flags choose (at most one of them)."""
    if plain and adaptive:
        raise InputError("--plain and --adaptive: choose one")
    return "plain" if plain else "adaptive" if adaptive else "agent"


def checked_images(paths: list[Path], slices: int = 1) -> list[str]:
    """Decode every image given on the command line now (a volume's views too), before a model
    server is started, so a bad file costs the user a second, not a server start-up."""
    from suwen.volumes import question_views

    checked = []
    for path in paths:
        question_views(path, slices)
        checked.append(str(path.expanduser().resolve()))
    return checked


def checked_priors(paths: list[Path], images: list[str], slices: int = 1) -> list[str]:
    """``--prior`` images, checked like ``--image``; a prior needs a current study."""
    if paths and not images:
        raise InputError("--prior: give the current study with --image as well")
    return checked_images(paths, slices)


def command_line_dates(
    images: list[str], dates: list[str], priors: list[str], prior_dates: list[str]
) -> dict[str, str]:
    """``--date`` and ``--prior-date``, checked and paired with the images they date."""
    from suwen.studies import given_dates

    return {
        **given_dates(priors, prior_dates, "--prior-date", "--prior"),
        **given_dates(images, dates, "--date", "--image"),
    }
