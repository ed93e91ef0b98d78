"""Shared set-up for the agent tests: a tiny corpus, settings, and a one-call runner."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from suwen.agent.graph import SuwenAgent
from suwen.config import Settings
from suwen.types import AgentEvent, AgentResult, AnswerFormat, Question
from tests.fake_model import FakeModel
from tests.fake_search import FakeImageSearch, FakeTextSearch, case_hit, text_hit

QUESTION = "What is the first-line treatment for a tension pneumothorax?"
NODES = ["look", "plan", "retrieve", "reread", "decide", "answer", "verify", "assess"]


def corpus() -> list[Any]:
    return [
        text_hit(
            "111",
            "Tension pneumothorax management",
            "Tension pneumothorax requires immediate needle decompression. "
            "A chest tube is placed after decompression.",
        ),
        text_hit(
            "222",
            "Pneumothorax imaging",
            "Chest radiography shows the visceral pleural line. CT finds small collections.",
        ),
        text_hit(
            "333",
            "Diabetes care",
            "Metformin is the preferred initial therapy for type 2 diabetes.",
        ),
        text_hit(
            "444",
            "Chest tube outcomes in tension pneumothorax",
            "Chest tube drainage after needle decompression resolves tension pneumothorax.",
        ),
    ]


def cases() -> list[tuple[Any, str]]:
    return [
        (case_hit("synpic1", "Right tension pneumothorax with mediastinal shift."), "a" * 64),
        (case_hit("synpic2", "Normal chest radiograph."), "b" * 64),
    ]


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"home": tmp_path / "home", "rounds": 2, "max_queries": 3}
    values.update(overrides)
    return Settings(**values)


def make_agent(
    tmp_path: Path,
    model: FakeModel,
    *,
    text: FakeTextSearch | None = None,
    images: FakeImageSearch | None = None,
    checkpointer: Any = None,
    **overrides: Any,
) -> SuwenAgent:
    return SuwenAgent(settings(tmp_path, **overrides), model, text, images, checkpointer)


def question(text: str = QUESTION, **fields: Any) -> Question:
    fmt = fields.pop("answer_format", None)
    return Question(text=text, answer_format=fmt or AnswerFormat(), **fields)


def ask(
    agent: SuwenAgent, q: Question, events: list[AgentEvent] | None = None, **kwargs: Any
) -> AgentResult:
    sink = events.append if events is not None else None
    return asyncio.run(agent.run(q, on_event=sink, **kwargs))


def visited(result: AgentResult) -> list[str]:
    return [event.node for event in result.trace]


def degraded_nodes(result: AgentResult) -> list[str]:
    return [event.node for event in result.trace if event.degraded]
