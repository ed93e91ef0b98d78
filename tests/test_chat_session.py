"""The chat's parts that need no terminal: session state, saved threads, transcript, completion."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from rich.console import Console

from suwen.agent.sessions import conversation_exists, open_sessions, saved_conversations
from suwen.chat_session import ChatSession, write_atomically
from suwen.commands.answer_view import numbered_evidence, transcript_markdown
from suwen.commands.chat import AnswerStream, ChatCompleter
from suwen.errors import InputError
from suwen.types import AgentEvent
from tests.agent_helpers import QUESTION, cases, corpus, make_agent
from tests.fake_model import FakeModel
from tests.fake_search import FakeImageSearch, FakeTextSearch


def _png(path: Path) -> Path:
    Image.new("RGB", (24, 24), (10, 200, 30)).save(path)
    return path


async def _session_run(tmp_path: Path, steps):
    async with open_sessions(make_agent(tmp_path, FakeModel()).settings) as saver:
        agent = make_agent(
            tmp_path,
            FakeModel(),
            text=FakeTextSearch(corpus()),
            images=FakeImageSearch(cases()),
            checkpointer=saver,
        )
        return await steps(agent)


def test_session_attaches_images_asks_in_its_thread_and_starts_over(tmp_path: Path) -> None:
    prior, current = _png(tmp_path / "prior.png"), _png(tmp_path / "current study.png")
    (tmp_path / "broken.png").write_bytes(b"no pixels here")

    async def steps(agent):
        session = ChatSession(agent)
        session.attach(str(prior))
        session.attach(str(current).replace(" ", "\\ "))  # an escaped space, as pasted
        assert session.images == [prior, current]
        session.attach(f"'{prior}'")  # pasted with quotes; attaching twice keeps one copy
        with pytest.raises(InputError, match=r"broken\.png"):
            session.attach(str(tmp_path / "broken.png"))
        with pytest.raises(InputError, match="needs a path"):
            session.attach("  ")
        first = await session.ask(QUESTION)
        follow_up = await session.ask("And the chest tube after decompression?")
        session.toggle_plain()
        plain = await session.ask("Plainly, what is a pneumothorax?")
        history = await session.history(session.thread_id)
        old_thread = session.thread_id
        new_thread = session.new_thread()
        return session, agent, first, follow_up, plain, history, old_thread, new_thread

    session, agent, first, follow_up, plain, history, old, new = asyncio.run(
        _session_run(tmp_path, steps)
    )
    look = agent.nodes.model.calls_for("look")[0]
    assert look.images == 2  # prior and current study, both shown to the model
    assert first.thread_id == follow_up.thread_id == plain.thread_id == old
    assert first.mode == "agent" and plain.mode == "plain"
    assert [turn.question for turn in history] == [
        QUESTION,
        "And the chest tube after decompression?",
        "Plainly, what is a pneumothorax?",
    ]
    assert new != old and session.images == [] and session.turns == []
    assert asyncio.run(conversation_exists(agent.settings, old))
    assert not asyncio.run(conversation_exists(agent.settings, new))


def test_saved_conversations_list_newest_first(tmp_path: Path) -> None:
    async def steps(agent):
        for thread in ("older", "newer"):
            await ChatSession(agent, thread_id=thread).ask(QUESTION)
            await asyncio.sleep(0.01)
        return agent.settings

    config = asyncio.run(_session_run(tmp_path, steps))
    threads = asyncio.run(saved_conversations(config))
    assert [t.thread_id for t in threads] == ["newer", "older"]
    assert all(t.turns == 1 and t.first_question == QUESTION for t in threads)
    assert threads[0].last_active >= threads[1].last_active  # type: ignore[operator]
    fresh = make_agent(tmp_path / "fresh", FakeModel()).settings
    assert asyncio.run(saved_conversations(fresh)) == []
    assert not fresh.sessions_db.exists(), "listing must not create a store"
    fresh.sessions_db.parent.mkdir(parents=True)
    fresh.sessions_db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(InputError, match=r"sessions\.sqlite: cannot open"):
        asyncio.run(saved_conversations(fresh))


def test_transcript_numbers_sources_as_the_answer_does(tmp_path: Path) -> None:
    async def steps(agent):
        session = ChatSession(agent, thread_id="t1")
        await session.ask(QUESTION)
        return session

    session = asyncio.run(_session_run(tmp_path, steps))
    result = session.turns[0].result
    entries = numbered_evidence(result)
    assert [e.number for e in entries] == list(range(1, len(entries) + 1))
    assert [e.key for e in entries if e.cited] == [c.key for c in result.citations]
    text = transcript_markdown("t1", [], session.turns)
    assert text.startswith("# Suwen conversation t1")
    assert "not medical advice" in text
    assert f"## 1. {QUESTION}" in text and result.answer in text
    for entry in entries:
        assert f"{entry.number}. {entry.source_label}" in text


def test_write_atomically_replaces_whole_files_only(tmp_path: Path) -> None:
    target = tmp_path / "t.md"
    target.write_text("old", encoding="utf-8")
    write_atomically(target, "new text\n")
    assert target.read_text(encoding="utf-8") == "new text\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.md"]
    with pytest.raises(InputError, match="is a folder"):
        write_atomically(tmp_path, "x")
    with pytest.raises(InputError, match="no such folder"):
        write_atomically(tmp_path / "missing" / "t.md", "x")


def test_completer_offers_commands_and_paths(tmp_path: Path) -> None:
    _png(tmp_path / "knee.png")
    (tmp_path / "notes").mkdir()
    completer = ChatCompleter()

    def complete(text: str) -> list[str]:
        document = Document(text, len(text))
        return [c.text for c in completer.get_completions(document, CompleteEvent())]

    assert complete("/ev") == ["/evidence"]
    assert set(complete("/s")) == {"/save", "/sessions"}
    assert complete(f"/image {tmp_path}/kn") == ["ee.png"]
    assert complete("What is") == []


def test_answer_stream_shows_steps_and_the_latest_lines() -> None:
    view = AnswerStream()
    view.on_event(AgentEvent(kind="node_start", node="retrieve", message="searching PubMed: x"))
    view.on_event(AgentEvent(kind="node_end", node="retrieve", message="3 new passages"))
    view.on_event(AgentEvent(kind="node_start", node="answer", message="writing the answer"))
    for number in range(40):
        view.on_event(AgentEvent(kind="token", token=f"line {number}\n\n"))
    console = Console(width=60, height=12, record=True, file=io.StringIO())
    console.print(view)
    shown = console.export_text()
    assert "✓ searching PubMed: x -- 3 new passages" in shown
    assert "… writing the answer" in shown
    assert "line 39" in shown and "line 0\n" not in shown
    assert len(shown.strip().splitlines()) <= 12
