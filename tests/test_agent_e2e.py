"""End to end: the agent through a real vLLM server (tiny random Lingshu-architecture checkpoint
on the CPU) with the real MiniLM PubMed index and the tiny-BiomedCLIP image index built from
../shared/data. The model's words are random, so this checks what must hold whatever it says:
the result's structure, citations drawn only from reread evidence, and a trace that names every
node the run went through."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from suwen.agent.graph import SuwenAgent
from suwen.agent.sessions import open_sessions
from suwen.config import Settings
from suwen.llm.client import VLLMClient
from suwen.privacy import local_api_key
from suwen.retrieval.images import ImageSearcher
from suwen.retrieval.text import TextSearcher
from suwen.types import AgentEvent, AgentResult, AnswerFormat, Question
from tests.fixtures_images import INDEX_NAME as IMAGE_INDEX
from tests.fixtures_text import TEXT_INDEX

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

AGENT_NODES = {"look", "plan", "retrieve", "reread", "decide", "answer", "verify", "assess"}


def _check_result(result: AgentResult, events: list[AgentEvent]) -> None:
    json.loads(result.model_dump_json())  # what `suwen ask --json` prints
    visited = [event.node for event in result.trace]
    assert visited[0] == "look" and visited[-3:] == ["answer", "verify", "assess"]
    assert set(visited) == AGENT_NODES
    assert visited.count("retrieve") == result.rounds >= 1
    # The trace names every node the graph ran, in the order the stream reported them.
    assert visited == [e.node for e in events if e.kind == "node_end"]
    kept = {item.key for item in result.evidence if item.kept}
    assert {citation.key for citation in result.citations} <= kept
    assert all(0 <= item.relevance <= 1 for item in result.evidence)
    assert result.model_calls >= 3 and result.tokens.prompt > 0
    assert set(result.timings) == {*AGENT_NODES, "total"}
    assert all(seconds >= 0 for seconds in result.timings.values())


def test_agent_through_real_vllm_and_indexes(
    vllm_url: str,
    vllm_settings: Settings,
    text_settings: Settings,
    image_settings: Settings,
    image_index: str,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    settings = vllm_settings.model_copy(
        update={"home": tmp_path, "max_queries": 2, "text_k": 3, "image_k": 2, "rounds": 2}
    )
    image = shared_data / "vqa_rad" / "images" / "synpic42202.jpg"
    question = Question(
        text="Is there evidence of an aortic aneurysm?",
        images=[str(image)],
        answer_format=AnswerFormat(kind="closed"),
    )

    async def go() -> tuple[AgentResult, list[AgentEvent], list[str]]:
        text = TextSearcher.open(text_settings, TEXT_INDEX)
        images = ImageSearcher.open(image_settings, IMAGE_INDEX)
        try:
            # The session's server was started from its own data home: pass its key.
            key = local_api_key(vllm_settings.home)
            client = VLLMClient([vllm_url], settings, api_key=key)
            async with client as model, open_sessions(settings) as saver:
                agent = SuwenAgent(settings, model, text, images, saver)
                events: list[AgentEvent] = []
                result = await agent.run(question, thread_id="e2e", on_event=events.append)
                plain = await agent.run(
                    Question(text="And is the heart enlarged?"), mode="plain", thread_id="e2e"
                )
                assert plain.mode == "plain" and plain.citations == [] and plain.evidence == []
                assert [event.node for event in plain.trace] == ["answer", "verify", "assess"]
                turns = [turn.question for turn in await agent.history("e2e")]
                return result, events, turns
        finally:
            text.close()
            images.close()

    result, events, turns = asyncio.run(go())
    _check_result(result, events)
    # Round one searched both indexes: passages for the planned queries and similar cases.
    first_retrieve = next(event for event in result.trace if event.node == "retrieve")
    found = re.search(r"(\d+) new passages from (\d+) queries, (\d+) cases", first_retrieve.message)
    assert found and int(found.group(2)) >= 1 and int(found.group(3)) == 2, first_retrieve.message
    assert turns == [question.text, "And is the heart enlarged?"]
