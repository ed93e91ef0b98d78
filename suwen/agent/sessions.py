"""Conversation storage: the one module that opens, lists and deletes saved conversations.

A conversation is a LangGraph thread whose checkpoints live in ``sessions.sqlite``
(``AsyncSqliteSaver``). Everything here reads and deletes them through the checkpointer's API
(``alist``, ``aget_tuple``, ``adelete_thread``), never through LangGraph's tables. On top,
Suwen keeps one table of its own in the same file: the transcripts chat's ``/save`` wrote for
a thread (path and content hash), so deleting the conversation also deletes those copies of it
(a transcript edited since, or replaced by another file, is left alone and reported).

Deleted text must not linger: connections run with ``secure_delete`` (freed pages are zeroed)
and every deletion ends with ``VACUUM`` and a truncating WAL checkpoint, so neither
``sessions.sqlite`` nor its ``-wal`` file holds a deleted question afterwards.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from suwen.agent.state import CHECKPOINT_TYPES
from suwen.config import Settings
from suwen.digests import sha256_of
from suwen.errors import InputError
from suwen.privacy import private_dir

# The file prompt_toolkit keeps chat's typed lines in (inside the data home), when it does.
CHAT_INPUT_HISTORY = "chat_history"

_TRANSCRIPTS_TABLE = """
CREATE TABLE IF NOT EXISTS suwen_transcripts (
    thread_id TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (thread_id, path)
)"""


# Conversations saved before text and image hits were told apart hold ``suwen.types.Hit``
# objects (one flat model, now the TextHit | ImageHit union). Allowed here, they come back as
# the data they were saved as, without a warning (the union cannot be called to rebuild one):
# inside evidence that data validates into a TextHit or an ImageHit; a bare list of them is
# per-question scratch that the next question resets (tests/test_agent_sessions.py).
_SAVED_BEFORE_HIT_KINDS = ("suwen.types", "Hit")


def session_serializer() -> JsonPlusSerializer:
    """Checkpoint serde that revives only the agent's own types (and never unpickles)."""
    return JsonPlusSerializer(allowed_msgpack_modules=[*CHECKPOINT_TYPES, _SAVED_BEFORE_HIT_KINDS])


@asynccontextmanager
async def open_sessions(settings: Settings) -> AsyncIterator[AsyncSqliteSaver]:
    """The conversation store at ``settings.sessions_db``, created (owner-only) on first use."""
    path = settings.sessions_db
    _create_private(path)
    async with aiosqlite.connect(str(path)) as conn:
        saver = AsyncSqliteSaver(conn, serde=session_serializer())
        try:
            await conn.execute("PRAGMA secure_delete = ON")
            await saver.setup()
            await conn.execute(_TRANSCRIPTS_TABLE)
            await conn.commit()
        except aiosqlite.DatabaseError as exc:
            raise InputError(f"{path}: cannot open the sessions database: {exc}") from exc
        yield saver


def _create_private(path: Path) -> None:
    """Create the database file owner-only before SQLite opens it (SQLite gives its -wal and
    -shm files the database file's permissions), and tighten an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o077:
            file.chmod(0o600)


@dataclass(frozen=True)
class SavedConversation:
    """One saved conversation, as of its newest checkpoint."""

    thread_id: str
    turns: int  # finished questions
    last_active: datetime | None
    first_question: str
    transcripts: list[Path] = field(default_factory=list)


@dataclass
class Removed:
    """What a deletion removed, and the transcripts it left because they changed since."""

    conversations: list[str] = field(default_factory=list)
    transcripts: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    input_history: Path | None = None  # chat's typed lines, removed by a purge
    compacted: bool = True  # False: another connection blocked VACUUM or the WAL truncation


class ConversationStore:
    """Saved conversations of one sessions database, read and deleted through ``saver``."""

    def __init__(self, saver: AsyncSqliteSaver, path: Path) -> None:
        self.saver = saver
        self.path = path

    async def conversations(self) -> list[SavedConversation]:
        """Every conversation, most recently active first."""
        newest: dict[str, SavedConversation] = {}
        # alist walks all checkpoints newest first: a thread's first one seen is its latest.
        async for item in self.saver.alist(None):
            config = item.config["configurable"]
            thread = str(config["thread_id"])
            if config.get("checkpoint_ns", "") != "" or thread in newest:
                continue
            newest[thread] = _summary(thread, item.checkpoint)
        transcripts = await self._transcripts()
        return [replace(c, transcripts=transcripts.get(c.thread_id, [])) for c in newest.values()]

    async def exists(self, thread_id: str) -> bool:
        config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        return await self.saver.aget_tuple(config) is not None

    async def delete(self, thread_id: str) -> Removed:
        """Remove one conversation's checkpoints and transcripts; unknown ids are an error."""
        transcripts = (await self._transcripts()).get(thread_id, [])
        if not transcripts and not await self.exists(thread_id):
            raise InputError(f"{thread_id}: no saved conversation with that id in {self.path}")
        removed = Removed(conversations=[thread_id])
        await self._forget(thread_id, removed)
        removed.compacted = await self._compact()
        return removed

    async def purge(self) -> Removed:
        """Remove every conversation, every transcript Suwen wrote, and chat's input history."""
        removed = Removed()
        threads = [c.thread_id for c in await self.conversations()]
        threads += [t for t in await self._transcripts() if t not in threads]
        for thread_id in threads:
            removed.conversations.append(thread_id)
            await self._forget(thread_id, removed)
        removed.compacted = await self._compact()
        return removed

    async def _forget(self, thread_id: str, removed: Removed) -> None:
        await self.saver.adelete_thread(thread_id)
        for path, digest in await self._transcript_rows(thread_id):
            if _sha256(path) == digest:
                path.unlink(missing_ok=True)
                removed.transcripts.append(path)
            elif path.exists():
                removed.kept.append(path)
        async with self.saver.lock:
            await self.saver.conn.execute(
                "DELETE FROM suwen_transcripts WHERE thread_id = ?", (thread_id,)
            )
            await self.saver.conn.commit()

    async def _compact(self) -> bool:
        """VACUUM and truncate the WAL, so deleted text is in neither file; False when another
        connection kept the WAL from being truncated."""
        async with self.saver.lock:
            conn = self.saver.conn
            await conn.commit()
            try:
                await conn.execute("VACUUM")
            except aiosqlite.OperationalError:
                return False  # busy: another process is writing
            async with conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                row = await cursor.fetchone()
        return row is not None and int(row[0]) == 0

    async def _transcripts(self) -> dict[str, list[Path]]:
        by_thread: dict[str, list[Path]] = {}
        async with self.saver.conn.execute(
            "SELECT thread_id, path FROM suwen_transcripts ORDER BY path"
        ) as cursor:
            async for thread_id, path in cursor:
                by_thread.setdefault(str(thread_id), []).append(Path(path))
        return by_thread

    async def _transcript_rows(self, thread_id: str) -> list[tuple[Path, str]]:
        async with self.saver.conn.execute(
            "SELECT path, sha256 FROM suwen_transcripts WHERE thread_id = ?", (thread_id,)
        ) as cursor:
            return [(Path(path), str(digest)) async for path, digest in cursor]


def _summary(thread_id: str, checkpoint: Any) -> SavedConversation:
    history = checkpoint.get("channel_values", {}).get("history") or []
    first = str(getattr(history[0], "question", "")) if history else ""
    try:
        when: datetime | None = datetime.fromisoformat(str(checkpoint.get("ts", "")))
    except ValueError:
        when = None
    return SavedConversation(thread_id, len(history), when, first)


@asynccontextmanager
async def conversation_store(settings: Settings) -> AsyncIterator[ConversationStore]:
    """The store of ``settings.sessions_db`` (created on first use, like the agent's)."""
    async with open_sessions(settings) as saver:
        yield ConversationStore(saver, settings.sessions_db)


async def saved_conversations(settings: Settings) -> list[SavedConversation]:
    """Saved conversations, newest first; none (and no file created) without a store."""
    if not settings.sessions_db.is_file():
        return []
    async with conversation_store(settings) as store:
        return await store.conversations()


async def conversation_exists(settings: Settings, thread_id: str) -> bool:
    if not settings.sessions_db.is_file():
        return False
    async with conversation_store(settings) as store:
        return await store.exists(thread_id)


async def delete_conversation(settings: Settings, thread_id: str) -> Removed:
    """One conversation gone: its checkpoints and the transcripts /save wrote of it (an
    unknown id, or no store at all, is an error naming it)."""
    if not settings.sessions_db.is_file():
        raise InputError(f"{thread_id}: no saved conversation (no {settings.sessions_db} yet)")
    async with conversation_store(settings) as store:
        return await store.delete(thread_id)


async def purge_all(settings: Settings) -> Removed:
    """Every conversation and transcript gone, and chat's typed-line history with them."""
    removed = Removed()
    if settings.sessions_db.is_file():
        async with conversation_store(settings) as store:
            removed = await store.purge()
    history = settings.home / CHAT_INPUT_HISTORY
    if history.is_file():
        history.unlink()
        removed.input_history = history
    return removed


def input_history_file(settings: Settings) -> Path | None:
    """The file chat's line editor keeps typed lines in, created owner-only in the data home
    (typed questions may name a patient), or None unless the setting ``chat_history`` asks for
    one. A file an older version left readable by others is closed to them."""
    if not settings.chat_history:
        return None
    path = private_dir(settings.home) / CHAT_INPUT_HISTORY
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
    path.chmod(0o600)
    return path


def record_transcript(sessions_db: Path, thread_id: str, path: Path) -> None:
    """Remember a transcript just written for ``thread_id``, so deleting the conversation
    deletes it too (if it still holds what was written)."""
    _create_private(sessions_db)
    try:
        with closing(sqlite3.connect(sessions_db, timeout=10)) as db, db:
            db.execute(_TRANSCRIPTS_TABLE)
            db.execute(
                "INSERT OR REPLACE INTO suwen_transcripts (thread_id, path, sha256) "
                "VALUES (?, ?, ?)",
                (thread_id, str(path.resolve()), _sha256(path)),
            )
    except sqlite3.Error as exc:
        raise InputError(f"{sessions_db}: cannot record the transcript {path}: {exc}") from exc


def _sha256(path: Path) -> str | None:
    try:
        return sha256_of(path)
    except InputError:
        return None
