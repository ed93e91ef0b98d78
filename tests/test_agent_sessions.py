"""Conversations persist in the SQLite checkpointer (follow-ups see earlier turns, a chat can be
resumed by a new process), and the run streams progress events and answer tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from suwen.agent.graph import SuwenAgent
from suwen.agent.sessions import open_sessions, saved_conversations
from suwen.config import Settings
from suwen.errors import InputError
from suwen.types import AgentEvent, AgentResult, ImageHit, TextHit
from tests.agent_helpers import NODES, QUESTION, corpus, question, settings
from tests.fake_model import FakeModel
from tests.fake_search import FakeTextSearch

PLAN = json.dumps({"queries": ["tension pneumothorax treatment", "needle decompression"]})
FOLLOW_UP = "And what comes after that step?"


async def _two_turns(tmp_path: Path, model: FakeModel) -> tuple[str, list[str]]:
    config = settings(tmp_path)
    async with open_sessions(config) as saver:
        agent = SuwenAgent(config, model, FakeTextSearch(corpus()), None, saver)
        first = await agent.run(question(), thread_id="chat-1")
        second = await agent.run(question(FOLLOW_UP), thread_id="chat-1")
        assert second.thread_id == first.thread_id == "chat-1"
        turns = [turn.question for turn in await agent.history("chat-1")]
        return first.answer, turns


def test_follow_up_sees_the_conversation(tmp_path: Path) -> None:
    model = FakeModel().script("plan", PLAN)
    first_answer, turns = asyncio.run(_two_turns(tmp_path, model))

    assert turns == [QUESTION, FOLLOW_UP]
    follow_up_calls = [c for c in model.calls if f"Question: {FOLLOW_UP}" in c.last]
    assert {c.purpose for c in follow_up_calls} >= {"look", "plan", "answer"}
    for call in follow_up_calls:
        roles = [(m.role, m.text) for m in call.messages]
        assert ("user", QUESTION) in roles
        # Earlier citation numbers are dropped: they pointed at the first question's evidence.
        earlier = next(text for role, text in roles if role == "assistant")
        assert earlier == first_answer.replace(" [1]", "").replace(" [2]", "")
    # The first question's prompts saw no history.
    assert all(m.role != "assistant" for m in model.calls[0].messages)


def test_a_follow_up_starts_with_its_own_trace_evidence_and_searches(tmp_path: Path) -> None:
    """Trace, evidence and searched queries are appended to within a question and start empty
    for the next one in the thread; history keeps growing."""
    config = settings(tmp_path)

    async def go() -> tuple[AgentResult, AgentResult, dict[str, Any]]:
        async with open_sessions(config) as saver:
            model = FakeModel().script("plan", PLAN)
            agent = SuwenAgent(config, model, FakeTextSearch(corpus()), None, saver)
            first = await agent.run(question(), thread_id="t")
            second = await agent.run(question(FOLLOW_UP), thread_id="t")
            state = await agent.graph.aget_state({"configurable": {"thread_id": "t"}})
            return first, second, state.values

    first, second, state = asyncio.run(go())
    assert [event.node for event in second.trace] == NODES
    keys = [item.key for item in first.evidence]
    assert keys and [item.key for item in second.evidence] == keys  # searched afresh, not "known"
    assert second.rounds == first.rounds == 1
    assert state["searched"] == json.loads(PLAN)["queries"]
    assert [turn.question for turn in state["history"]] == [QUESTION, FOLLOW_UP]


def test_chat_resumes_from_disk_in_a_new_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(_two_turns(tmp_path, FakeModel().script("plan", PLAN)))

    async def resume() -> tuple[list[str], list[str]]:
        config = settings(tmp_path)
        async with open_sessions(config) as saver:
            agent = SuwenAgent(config, FakeModel(), None, None, saver)
            before = [t.question for t in await agent.history("chat-1")]
            await agent.run(question("Thanks, one last question?"), thread_id="chat-1")
            after = [t.question for t in await agent.history("chat-1")]
            assert await agent.history("another-chat") == []
            return before, after

    with caplog.at_level(logging.WARNING):
        before, after = asyncio.run(resume())
    assert before == [QUESTION, FOLLOW_UP]
    assert after == [QUESTION, FOLLOW_UP, "Thanks, one last question?"]
    # Our types are on the serializer's allow-list: nothing revived with a warning.
    assert "unregistered type" not in caplog.text and "Blocked" not in caplog.text


class _FlatHit(BaseModel):
    """``suwen.types.Hit`` as conversations saved before text and image hits were told apart
    hold it: one flat model for both kinds."""

    key: str
    score: float
    kind: str
    index: str
    text: str = ""
    pmid: str | None = None
    chunk_id: str | None = None
    title: str | None = None
    case_id: str | None = None
    path: str | None = None
    caption: str | None = None


class _FlatEvidence(BaseModel):
    key: str
    hit: _FlatHit
    relevance: float
    quote: str = ""
    kept: bool = True


for _legacy, _name in ((_FlatHit, "Hit"), (_FlatEvidence, "Evidence")):
    _legacy.__module__, _legacy.__name__, _legacy.__qualname__ = "suwen.types", _name, _name

FLAT_PASSAGE = _FlatHit(
    key="pmid:111#0", score=0.5, kind="text", index="pubmed", pmid="111", chunk_id="111#0"
)
FLAT_CASE = _FlatHit(
    key="case:c1",
    score=0.9,
    kind="image",
    index="images",
    text="A case.",
    case_id="c1",
    path="/cases/c1.png",
    caption="A case.",
)


async def _save_flat_hits(config: Settings, thread_id: str) -> None:
    """Rewrite the thread's checkpoint as a version with one flat Hit type would have saved it
    (an interrupted run leaves un-reread hits behind)."""
    async with open_sessions(config) as saver:
        where: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        saved = await saver.aget_tuple(where)
        assert saved is not None
        values = saved.checkpoint["channel_values"]
        values["evidence"] = [
            _FlatEvidence(key=hit.key, hit=hit, relevance=0.8) for hit in (FLAT_PASSAGE, FLAT_CASE)
        ]
        values["hits"] = [FLAT_PASSAGE]
        await saver.aput(where, saved.checkpoint, saved.metadata, {})


def test_conversation_saved_with_flat_hits_still_loads_and_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = settings(tmp_path)

    async def go() -> tuple[list[Any], list[str], str]:
        async with open_sessions(config) as saver:
            await SuwenAgent(config, FakeModel(), None, None, saver).run(question(), thread_id="t")
        await _save_flat_hits(config, "t")
        async with open_sessions(config) as saver:
            agent = SuwenAgent(config, FakeModel(), None, None, saver)
            state = await agent.graph.aget_state({"configurable": {"thread_id": "t"}})
            evidence = [item.hit for item in state.values["evidence"]]
            result = await agent.run(question(FOLLOW_UP), thread_id="t")
            return evidence, [t.question for t in await agent.history("t")], result.answer

    with caplog.at_level(logging.WARNING):
        evidence, turns, answer = asyncio.run(go())
    passage, case = evidence
    assert isinstance(passage, TextHit) and passage.pmid == "111"
    assert isinstance(case, ImageHit) and (case.case_id, case.caption) == ("c1", "A case.")
    assert turns == [QUESTION, FOLLOW_UP] and answer
    assert [c.first_question for c in asyncio.run(saved_conversations(config))] == [QUESTION]
    assert "Blocked" not in caplog.text and "reconstruct" not in caplog.text


def test_threads_do_not_share_history(tmp_path: Path) -> None:
    async def go() -> list[str]:
        config = settings(tmp_path)
        async with open_sessions(config) as saver:
            agent = SuwenAgent(config, FakeModel(), None, None, saver)
            await agent.run(question(), thread_id="a")
            result = await agent.run(question(FOLLOW_UP), thread_id="b")
            assert result.thread_id == "b"
            return [t.question for t in await agent.history("b")]

    assert asyncio.run(go()) == [FOLLOW_UP]


def test_a_run_without_thread_gets_one(tmp_path: Path) -> None:
    async def go() -> str | None:
        config = settings(tmp_path)
        async with open_sessions(config) as saver:
            agent = SuwenAgent(config, FakeModel(), None, None, saver)
            return (await agent.run(question())).thread_id

    thread = asyncio.run(go())
    assert thread and len(thread) == 32


def test_follow_up_without_image_keeps_the_conversation_image(
    tmp_path: Path, shared_data: Path
) -> None:
    image = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0]
    model = FakeModel()

    async def go() -> None:
        config = settings(tmp_path)
        async with open_sessions(config) as saver:
            agent = SuwenAgent(config, model, None, None, saver)
            await agent.run(question("What is shown?", images=[str(image)]), thread_id="img")
            await agent.run(question("Is it on the left?"), thread_id="img")

    asyncio.run(go())
    follow_up = next(c for c in model.calls_for("answer") if "Is it on the left?" in c.last)
    assert follow_up.images == 1


def test_unreadable_sessions_file_is_a_clear_error(tmp_path: Path) -> None:
    config = settings(tmp_path)
    config.sessions_db.parent.mkdir(parents=True)
    config.sessions_db.write_bytes(b"this is not a database" * 100)

    async def go() -> None:
        async with open_sessions(config):
            pass

    with pytest.raises(InputError, match=r"sessions\.sqlite: cannot open the sessions database"):
        asyncio.run(go())


def test_sessions_database_holds_no_pickle(tmp_path: Path) -> None:
    asyncio.run(_two_turns(tmp_path, FakeModel().script("plan", PLAN)))
    with sqlite3.connect(settings(tmp_path).sessions_db) as db:
        kinds = {row[0] for row in db.execute("SELECT type FROM checkpoints")}
        kinds |= {row[0] for row in db.execute("SELECT type FROM writes")}
    assert kinds and "pickle" not in kinds


def test_events_stream_progress_and_tokens(tmp_path: Path) -> None:
    model = FakeModel().script("plan", PLAN)
    agent = SuwenAgent(settings(tmp_path), model, FakeTextSearch(corpus()), None)
    events: list[AgentEvent] = []
    result = asyncio.run(agent.run(question(), on_event=events.append))

    starts = [e.node for e in events if e.kind == "node_start"]
    ends = [e.node for e in events if e.kind == "node_end"]
    assert starts == ends == NODES
    # Each node starts, then (tokens, for the answer), then ends, before the next starts.
    order = [(e.kind, e.node) for e in events if e.kind != "token"]
    assert order == [(kind, node) for node in NODES for kind in ("node_start", "node_end")]
    messages = {e.node: e.message for e in events if e.kind == "node_start"}
    assert (
        messages["retrieve"]
        == "searching PubMed: tension pneumothorax treatment; needle decompression"
    )
    assert messages["reread"] == f"rereading {len(result.evidence)} passages"
    tokens = [e.token for e in events if e.kind == "token"]
    assert len(tokens) > 3 and all(e.node == "answer" for e in events if e.kind == "token")
    assert "".join(tokens).startswith(result.answer)
    ends_by_node = {e.node: e.message for e in events if e.kind == "node_end"}
    assert ends_by_node == {e.node: e.message for e in result.trace}


def test_degraded_steps_are_announced(tmp_path: Path) -> None:
    model = FakeModel().script("look", "not json at all")
    agent = SuwenAgent(settings(tmp_path), model, None, None)
    events: list[AgentEvent] = []
    asyncio.run(agent.run(question(), on_event=events.append))
    infos = [e for e in events if e.kind == "info"]
    assert [e.node for e in infos] == ["look"] and infos[0].message.startswith("degraded: ")
