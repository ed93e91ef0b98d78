"""`suwen sessions list | delete ID | purge`: conversations made through the agent (scripted
model) are listed, deleted one at a time or all at once, with the transcripts /save wrote; a
deleted question's text is then in no byte of sessions.sqlite or its WAL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen.agent.graph import SuwenAgent
from suwen.agent.sessions import (
    CHAT_INPUT_HISTORY,
    conversation_store,
    open_sessions,
    saved_conversations,
)
from suwen.chat_session import ChatSession
from suwen.cli import app
from suwen.config import Settings
from tests.agent_helpers import corpus, question, settings
from tests.fake_model import FakeModel
from tests.fake_search import FakeTextSearch

# Each question is unique text, so its bytes can be looked for in the database files.
KEEP = "Which antibiotic for community-acquired pneumonia in patient KEEP-3141?"
DROP = "Is the nodule in patient DROP-2718's left lung malignant?"
DROP_FOLLOW_UP = "And what follow-up interval for DROP-2718?"
OTHER = "What dose of aspirin after a myocardial infarction, patient OTHER-1618?"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SUWEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "250")
    return tmp_path / "home"


def store_bytes(config: Settings) -> bytes:
    """Every byte of the sessions database and its WAL/SHM files, as they are on disk."""
    files = sorted(config.sessions_db.parent.glob(config.sessions_db.name + "*"))
    assert config.sessions_db in files
    return b"".join(path.read_bytes() for path in files)


def make_conversations(tmp_path: Path, config: Settings) -> dict[str, Path]:
    """Three conversations through the agent; /save transcripts of "drop" (twice) and "keep"."""

    async def go() -> dict[str, Path]:
        async with open_sessions(config) as saver:
            agent = SuwenAgent(config, FakeModel(), FakeTextSearch(corpus()), None, saver)
            chats = {name: ChatSession(agent, thread_id=name) for name in ("keep", "drop", "other")}
            await chats["keep"].ask(KEEP)
            await chats["drop"].ask(DROP)
            await chats["drop"].ask(DROP_FOLLOW_UP)
            await chats["other"].ask(OTHER)
            saved = {}
            for name, text in (("drop", DROP), ("drop-edited", DROP), ("keep", KEEP)):
                chat = chats[name.split("-")[0]]
                path = tmp_path / f"{name}.md"
                saved[name] = chat.save_transcript(
                    path, f"# transcript\n{text}\n", config.sessions_db
                )
            return saved

    transcripts = asyncio.run(go())
    # The user edits one saved transcript afterwards: it is no longer what Suwen wrote.
    with transcripts["drop-edited"].open("a") as handle:
        handle.write("my own notes\n")
    return transcripts


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["sessions", *args])
    return result.exit_code, result.output


@pytest.fixture()
def made(tmp_path: Path, home: Path) -> Iterator[tuple[Settings, dict[str, Path]]]:
    config = settings(tmp_path)
    assert config.home == home
    yield config, make_conversations(tmp_path, config)


def test_list_shows_each_conversation_with_its_turns_question_and_transcripts(made) -> None:
    config, transcripts = made
    code, output = cli("list")
    assert code == 0, output
    rows = [line for line in output.splitlines() if line.startswith("│")]
    # Newest first: other, drop, keep.
    firsts = [row.split("│")[1].strip() for row in rows if row.split("│")[1].strip()]
    assert firsts[:3] == ["other", "drop", "keep"]
    assert DROP[:40] in output and str(transcripts["keep"]) in output
    listed = {c.thread_id: c for c in asyncio.run(saved_conversations(config))}
    assert listed["drop"].turns == 2 and listed["drop"].first_question == DROP
    assert listed["drop"].transcripts == sorted([transcripts["drop"], transcripts["drop-edited"]])


def test_delete_removes_the_checkpoints_and_transcripts_and_leaves_no_text_behind(made) -> None:
    config, transcripts = made
    before = store_bytes(config)
    assert DROP.encode() in before and DROP_FOLLOW_UP.encode() in before

    code, output = cli("delete", "drop")
    assert code == 0, output
    assert "deleted 1 conversation" in output
    assert f"deleted transcript {transcripts['drop']}" in output
    assert f"kept transcript {transcripts['drop-edited']}: changed" in output
    assert not transcripts["drop"].exists() and transcripts["drop-edited"].exists()
    assert transcripts["keep"].exists()

    after = store_bytes(config)
    for text in (DROP, DROP_FOLLOW_UP, "DROP-2718"):
        assert text.encode() not in after, f"{text!r} still in the sessions files"
    assert KEEP.encode() in after and OTHER.encode() in after  # the search would find text
    assert [c.thread_id for c in asyncio.run(saved_conversations(config))] == ["other", "keep"]

    async def history(thread: str) -> list[str]:
        async with open_sessions(config) as saver:
            agent = SuwenAgent(config, FakeModel(), None, None, saver)
            return [turn.question for turn in await agent.history(thread)]

    assert asyncio.run(history("keep")) == [KEEP]
    assert asyncio.run(history("drop")) == []


def test_delete_while_a_chat_holds_the_store_open_still_leaves_no_text(made) -> None:
    config, _ = made

    async def go() -> bool:
        async with open_sessions(config) as chat_saver:  # a chat running in another window
            agent = SuwenAgent(config, FakeModel(), None, None, chat_saver)
            assert [t.question for t in await agent.history("keep")] == [KEEP]
            async with conversation_store(config) as store:
                removed = await store.delete("drop")
            assert DROP.encode() not in store_bytes(config)
            return removed.compacted

    assert asyncio.run(go())


def test_delete_during_another_process_read_says_so_and_the_text_goes_when_it_closes(
    made,
) -> None:
    config, _ = made
    reader = sqlite3.connect(config.sessions_db)  # another process in a read transaction
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sqlite_master").fetchone()
        code, output = cli("delete", "drop")
        assert code == 0 and "deleted 1 conversation" in output
        assert "another Suwen process has" in " ".join(output.split())
        assert [c.thread_id for c in asyncio.run(saved_conversations(config))] == ["other", "keep"]
    finally:
        reader.rollback()
        reader.close()
    assert DROP.encode() not in store_bytes(config)


def test_unknown_id_is_a_one_line_error(made) -> None:
    config, _ = made
    code, output = cli("delete", "no-such-chat")
    assert code == 2
    assert "no-such-chat: no saved conversation with that id" in output
    assert len(asyncio.run(saved_conversations(config))) == 3


def test_purge_removes_everything_and_chat_input_history(made) -> None:
    config, transcripts = made
    typed = config.home / CHAT_INPUT_HISTORY  # what chat's line editor keeps, when it does
    typed.write_text(f"\n+{KEEP}\n", encoding="utf-8")

    code, output = cli("purge")  # asks first; no answer means no
    assert code == 1 and len(asyncio.run(saved_conversations(config))) == 3

    code, output = cli("purge", "--yes")
    assert code == 0, output
    assert "deleted 3 conversations" in output
    assert not typed.exists() and not transcripts["keep"].exists()
    assert transcripts["drop-edited"].exists()  # edited by the user: theirs now
    data = store_bytes(config)
    for text in (KEEP, DROP, DROP_FOLLOW_UP, OTHER):
        assert text.encode() not in data
    code, output = cli("list")
    assert code == 0 and "no saved conversations" in output


def test_store_and_transcripts_are_owner_only(tmp_path: Path, home: Path) -> None:
    previous = os.umask(0o022)  # a usual umask: files would be world-readable
    try:
        config = settings(tmp_path)
        transcripts = make_conversations(tmp_path, config)

        async def modes_while_open() -> dict[str, int]:
            async with open_sessions(config) as saver:
                agent = SuwenAgent(config, FakeModel(), None, None, saver)
                await agent.run(question(KEEP), thread_id="keep")
                files = config.sessions_db.parent.glob(config.sessions_db.name + "*")
                return {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}

        modes = asyncio.run(modes_while_open())
    finally:
        os.umask(previous)
    assert {"sessions.sqlite", "sessions.sqlite-wal"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes
    assert stat.S_IMODE(transcripts["keep"].stat().st_mode) == 0o600


def test_commands_on_a_fresh_home_create_nothing(home: Path) -> None:
    assert cli("list") == (0, f"no saved conversations in {home / 'sessions.sqlite'}\n")
    code, output = cli("delete", "x")
    assert code == 2 and "x: no saved conversation" in output
    assert cli("purge", "--yes")[0] == 0
    assert not (home / "sessions.sqlite").exists()
