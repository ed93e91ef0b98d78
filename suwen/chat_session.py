"""One interactive conversation: its thread, attached images, mode and turns (no printing here).

The conversation itself (what earlier turns said) lives in the agent's checkpointer under the
thread id, so a follow-up question sees it and ``suwen chat --resume THREAD`` continues it. This
object keeps what the terminal needs on top: the images attached with ``/image``, whether the
baseline (plain) mode is on, and the turns of this sitting for ``/save``. Listing and deleting
saved conversations is ``suwen.agent.sessions``'s business.
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from suwen.agent.sessions import record_transcript
from suwen.agent.state import Turn
from suwen.errors import InputError
from suwen.files import atomic_write_text
from suwen.medimage import load_image
from suwen.studies import normalise_date
from suwen.types import AgentEvent, AgentResult, Mode, Question

ImageCheck = Callable[[Path], object]


class AgentRunner(Protocol):
    """What a chat needs from ``suwen.agent.graph.SuwenAgent``."""

    async def run(
        self,
        question: Question,
        *,
        mode: Mode = ...,
        thread_id: str | None = ...,
        on_event: Callable[[AgentEvent], None] | None = ...,
    ) -> AgentResult: ...

    async def history(self, thread_id: str) -> list[Turn]: ...


@dataclass(frozen=True)
class ChatTurn:
    question: str
    images: list[str]
    result: AgentResult


@dataclass
class ChatSession:
    agent: AgentRunner
    thread_id: str = field(default_factory=lambda: new_thread_id())
    images: list[Path] = field(default_factory=list)
    priors: list[Path] = field(default_factory=list)  # earlier studies, compared against
    dates: dict[Path, str] = field(default_factory=dict)  # study dates given by the user
    plain: bool = False
    adaptive: bool = False  # plain first, the agent when the plain answer is unsure
    turns: list[ChatTurn] = field(default_factory=list)
    check_image: ImageCheck = load_image

    @property
    def mode(self) -> Mode:
        return "plain" if self.plain else "adaptive" if self.adaptive else "agent"

    @property
    def last(self) -> AgentResult | None:
        return self.turns[-1].result if self.turns else None

    def attach(self, raw_path: str, date: str | None = None) -> Path:
        """Attach an image for this and every later question; decoded now so a bad file is
        reported at once, not after a model call. Its study date: ``date`` (checked), or
        typed after the path as ``--date YYYY-MM-DD``."""
        raw_path, typed = _path_and_date(raw_path, "/image")
        if not raw_path.strip():
            raise InputError("/image needs a path")
        date = date or typed
        path = Path(_unquote(raw_path)).expanduser().resolve()
        self.check_image(path)
        if path not in self.images:
            self.images.append(path)
        if date is not None:
            self.dates[path] = date
        return path

    def attach_prior(self, raw_path: str, date: str | None = None) -> Path:
        """Attach an earlier study to compare the attached images (the current study) with."""
        raw_path, typed = _path_and_date(raw_path, "/prior")
        if not raw_path.strip():
            raise InputError("/prior needs a path")
        date = date or typed
        path = Path(_unquote(raw_path)).expanduser().resolve()
        self.check_image(path)
        if path not in self.priors:
            self.priors.append(path)
        if date is not None:
            self.dates[path] = date
        return path

    def toggle_plain(self) -> bool:
        self.plain = not self.plain
        self.adaptive = self.adaptive and not self.plain
        return self.plain

    def toggle_adaptive(self) -> bool:
        self.adaptive = not self.adaptive
        self.plain = self.plain and not self.adaptive
        return self.adaptive

    def new_thread(self) -> str:
        """Start over: a new thread, no images, no turns (the old thread stays saved)."""
        self.thread_id = new_thread_id()
        self.images.clear()
        self.priors.clear()
        self.dates.clear()
        self.turns.clear()
        return self.thread_id

    async def ask(
        self, text: str, on_event: Callable[[AgentEvent], None] | None = None
    ) -> AgentResult:
        """Ask within this thread. A cancelled question leaves no turn behind."""
        images = [str(p) for p in self.images]
        # A prior is compared with the current study; without one attached, it waits.
        priors = [str(p) for p in self.priors] if images else []
        dates = {str(path): date for path, date in self.dates.items()}
        question = Question(
            text=text.strip(),
            images=images,
            prior_images=priors,
            image_dates={p: dates[p] for p in [*priors, *images] if p in dates},
        )
        result = await self.agent.run(
            question, mode=self.mode, thread_id=self.thread_id, on_event=on_event
        )
        self.turns.append(ChatTurn(text.strip(), list(question.images), result))
        return result

    async def history(self, thread_id: str) -> list[Turn]:
        """The finished turns of a saved conversation, as the session store holds them."""
        return await self.agent.history(thread_id)

    async def start(
        self,
        images: list[str],
        priors: list[str],
        dates: dict[str, str],
        *,
        resume: str | None,
        on_notice: Callable[[str], None],
    ) -> list[Turn]:
        """Begin the sitting: the earlier turns of the conversation ``resume`` names (returned;
        none without it), the images it was about unless new ones are given, then ``images``
        and ``priors`` with their ``dates``. An image of the resumed conversation that cannot
        be attached any more is left out with a notice."""
        earlier = await self.history(resume) if resume else []
        kept = earlier[-1].images if earlier and not images else []
        for path in [*kept, *images]:
            try:
                self.attach(path, dates.get(path))
            except InputError as exc:
                on_notice(f"{exc} (attached earlier in this conversation; left out)")
        for path in priors:
            self.attach_prior(path, dates.get(path))
        return earlier

    def save_transcript(self, path: Path, text: str, sessions_db: Path) -> Path:
        """Write a transcript of this conversation (owner-only) and remember it with the
        thread, so deleting the conversation deletes this copy of it too."""
        written = write_atomically(path, text)
        record_transcript(sessions_db, self.thread_id, written)
        return written


_DATE_OPTION = re.compile(r"(?:^|\s)--date\s+(\S+)\s*$")


def _path_and_date(raw: str, command: str) -> tuple[str, str | None]:
    """``PATH [--date YYYY-MM-DD]`` as typed after /image or /prior (the date checked)."""
    match = _DATE_OPTION.search(raw)
    if match is None:
        return raw, None
    return raw[: match.start()], normalise_date(match.group(1), f"{command} --date")


def _unquote(raw: str) -> str:
    """A path as a terminal pastes it: 'quoted', "quoted" or with escaped spaces."""
    raw = raw.strip()
    try:
        parts = shlex.split(raw)
    except ValueError:
        return raw
    return parts[0] if len(parts) == 1 else raw


def new_thread_id() -> str:
    """Short enough to type after --resume, random enough never to collide in one data home."""
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def write_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees a
    half-written file, and an existing file is replaced only by a complete one."""
    path = path.expanduser()
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: no such folder")
    try:
        atomic_write_text(path, text)  # owner-only: a transcript holds what was asked
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return path
