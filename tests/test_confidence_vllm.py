"""The confidence probe through the real vLLM server on the tiny Qwen2.5-VL checkpoint: the
client asks for candidate tokens' log-probabilities after a prefill, and they become a
confidence in [0, 1] whose distribution over the options sums to one."""

from __future__ import annotations

import asyncio
import math

import pytest

from suwen.agent.confidence import closed_confidence, label_distribution, self_check_confidence
from suwen.agent.graph import SuwenAgent
from suwen.config import Settings
from suwen.llm.base import LogprobRequest, Message
from suwen.llm.client import VLLMClient
from suwen.llm.server import ManagedServer
from suwen.types import AnswerFormat, Question

pytestmark = pytest.mark.vllm


def client_of(server: ManagedServer, settings: Settings) -> VLLMClient:
    """A client with the managed server's own API key (it refuses any other)."""
    return VLLMClient([server.url], settings, model=server.model, api_key=server.api_key)


OPTIONS = {"A": "Pneumothorax", "B": "Pleural effusion", "C": "Normal chest"}
CHOICE = AnswerFormat(kind="choice", options=OPTIONS)
PROMPT = [
    Message(
        role="user",
        text="Question: What does the radiograph show?\nOptions:\nA. Pneumothorax\n"
        "B. Pleural effusion\nC. Normal chest\nEnd with 'Short answer: <letter>'.",
    )
]


def test_option_probabilities_from_the_tiny_model(
    vllm_server: ManagedServer, vllm_settings: Settings
) -> None:
    labels = {key: [key, " " + key] for key in OPTIONS}
    candidates = [text for texts in labels.values() for text in texts] + [" "]

    async def go():  # type: ignore[no-untyped-def]
        async with client_of(vllm_server, vllm_settings) as client:
            raw = await client.chat(
                PROMPT,
                max_tokens=1,
                temperature=0.0,
                prefill="The film shows it.\nShort answer:",
                logprobs=LogprobRequest(candidates=candidates),
            )
            measured = await closed_confidence(
                client, PROMPT, "The film shows it.\nShort answer: B", "B", CHOICE
            )
            checked = await self_check_confidence(client, "Is this normal?", [], "Yes, it is.")
            return raw, measured, checked

    raw, measured, checked = asyncio.run(go())
    assert raw.logprobs is not None and len(raw.logprobs) == 1
    position = raw.logprobs[0]
    # Every candidate's first token came back with a log-probability, by id.
    assert {c.text for c in position.candidates} == set(candidates)
    assert all(c.logprob <= 0 and math.isfinite(c.logprob) for c in position.candidates)
    distribution, mass = label_distribution(position, labels)
    assert set(distribution) == set(OPTIONS) and sum(distribution.values()) == pytest.approx(1)
    assert 0 < mass <= 1

    # The probe reads the same position (same prompt, same prefill, greedy) the same way.
    assert measured.source == "option-probability"
    assert measured.distribution == pytest.approx(distribution, rel=1e-3)
    assert measured.value is not None and 0 <= measured.value <= 1
    assert measured.value == pytest.approx(distribution["B"], rel=1e-3)

    assert checked.source == "self-check" and checked.value is not None
    assert 0 <= checked.value <= 1 and sum(checked.distribution.values()) == pytest.approx(1)


def test_every_plain_answer_gets_a_confidence(
    vllm_server: ManagedServer, vllm_settings: Settings
) -> None:
    async def go():  # type: ignore[no-untyped-def]
        async with client_of(vllm_server, vllm_settings) as client:
            agent = SuwenAgent(vllm_settings, client, None, None)
            question = Question(text="Which is it?", answer_format=CHOICE)
            return await agent.run(question, mode="plain")

    result = asyncio.run(go())
    assert result.confidence is not None and 0 <= result.confidence <= 1
    assert result.confidence_source in ("option-probability", "self-check")
    assert not result.calibrated
    assert result.trace[-1].node == "assess" and not result.trace[-1].degraded
