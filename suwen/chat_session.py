"""One interactive conversation: its thread, attached images, mode and turns (no printing here).

The conversation itself (what earlier turns said) lives in the agent's checkpointer under the
thread id, so a follow-up question sees it and ``suwen chat --resume THREAD`` continues it. This
object keeps what the terminal needs on top: the images attached with ``/image``, whether the
baseline (plain) mode is on, and the turns of this sitting for ``/save``.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from suwen.agent.state import Turn
from suwen.errors import InputError
from suwen.medimage import load_image
from suwen.types import AgentEvent, AgentResult, Question

Mode = Literal["agent", "plain"]
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
    plain: bool = False
    turns: list[ChatTurn] = field(default_factory=list)
    check_image: ImageCheck = load_image

    @property
    def mode(self) -> Mode:
        return "plain" if self.plain else "agent"

    @property
    def last(self) -> AgentResult | None:
        return self.turns[-1].result if self.turns else None

    def attach(self, raw_path: str) -> Path:
        """Attach an image for this and every later question; decoded now so a bad file is
        reported at once, not after a model call."""
        if not raw_path.strip():
            raise InputError("/image needs a path")
        path = Path(_unquote(raw_path)).expanduser().resolve()
        self.check_image(path)
        if path not in self.images:
            self.images.append(path)
        return path

    def toggle_plain(self) -> bool:
        self.plain = not self.plain
        return self.plain

    def new_thread(self) -> str:
        """Start over: a new thread, no images, no turns (the old thread stays saved)."""
        self.thread_id = new_thread_id()
        self.images.clear()
        self.turns.clear()
        return self.thread_id

    async def ask(
        self, text: str, on_event: Callable[[AgentEvent], None] | None = None
    ) -> AgentResult:
        """Ask within this thread. A cancelled question leaves no turn behind."""
        question = Question(text=text.strip(), images=[str(p) for p in self.images])
        result = await self.agent.run(
            question, mode=self.mode, thread_id=self.thread_id, on_event=on_event
        )
        self.turns.append(ChatTurn(text.strip(), list(question.images), result))
        return result

    async def history(self, thread_id: str) -> list[Turn]:
        """The finished turns of a saved conversation, as the session store holds them."""
        return await self.agent.history(thread_id)


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return path


@dataclass(frozen=True)
class SavedThread:
    thread_id: str
    checkpoints: int
    last_active: datetime | None


# 100-ns intervals between the UUID epoch (1582-10-15) and the Unix epoch.
_UUID_EPOCH_OFFSET = 0x01B21DD213814000


def saved_threads(sessions_db: Path, limit: int = 20) -> list[SavedThread]:
    """Threads in the session store, most recently active first.

    Reads LangGraph's ``checkpoints`` table directly and read-only: checkpoint ids are
    time-ordered UUIDv6, so the newest per thread says when it was last used, without
    deserialising every checkpoint as ``alist`` would.
    """
    rows = _query(
        sessions_db,
        "SELECT thread_id, COUNT(*), MAX(checkpoint_id) FROM checkpoints "
        "WHERE checkpoint_ns = '' GROUP BY thread_id ORDER BY MAX(checkpoint_id) DESC LIMIT ?",
        (limit,),
    )
    return [SavedThread(str(t), int(n), _uuid6_time(str(c))) for t, n, c in rows]


def thread_exists(sessions_db: Path, thread_id: str) -> bool:
    rows = _query(
        sessions_db, "SELECT 1 FROM checkpoints WHERE thread_id = ? LIMIT 1", (thread_id,)
    )
    return bool(rows)


def _query(sessions_db: Path, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
    if not sessions_db.is_file():
        return []
    uri = f"{sessions_db.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            return list(conn.execute(sql, params).fetchall())
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if "no such table" in str(exc):
            return []  # the store exists but nothing was ever saved in it
        raise InputError(f"{sessions_db}: cannot read saved sessions: {exc}") from exc


def _uuid6_time(checkpoint_id: str) -> datetime | None:
    try:
        value = uuid.UUID(checkpoint_id)
    except ValueError:
        return None
    if value.version != 6:
        return None
    ticks = ((value.int >> 80) << 12) | ((value.int >> 64) & 0x0FFF)
    return datetime.fromtimestamp((ticks - _UUID_EPOCH_OFFSET) / 1e7)
