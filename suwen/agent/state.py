"""The agent's typed state, the replies it asks the model for, and what one run needs at hand.

``AgentState`` is what LangGraph checkpoints: plain data and pydantic models only (loaded
images live in ``RunContext``, which is never persisted). ``history`` outlives a question, so a
follow-up in the same thread sees the conversation; every other field is reset when a new
question starts (see ``fresh_question_state``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from PIL import Image
from pydantic import BaseModel, Field

from suwen.llm.base import Message
from suwen.types import (
    Citation,
    Confidence,
    Evidence,
    Findings,
    GraphMode,
    Hit,
    ImageHit,
    Question,
    TextHit,
    TraceEvent,
)


class Turn(BaseModel):
    """One finished question and answer in a conversation."""

    question: str
    answer: str
    short_answer: str | None = None
    images: list[str] = Field(default_factory=list)


class AgentState(TypedDict, total=False):
    mode: GraphMode
    question: Question
    images: list[str]  # image paths in effect: this question's, else the conversation's
    history: list[Turn]  # earlier turns of this thread (persisted across questions)
    findings: Findings | None  # what look read off the image(s) and question
    queries: list[str]  # queries the next retrieval runs
    searched: list[str]  # every query already run for this question
    hits: list[Hit]  # hits of the latest retrieval, not yet reread
    evidence: list[Evidence]  # every reread item, kept or dropped, with its score
    round: int  # retrieval rounds done (bounded by settings.rounds)
    missing: list[str]  # what decide said the evidence still lacks
    numbered: list[str]  # evidence keys as numbered [1], [2] ... in the answer prompt
    draft: str  # the answer text before verification
    answer: str  # the verified answer
    short_answer: str | None
    citations: list[Citation]
    supported: bool
    unsupported_sentences: list[str]
    removed_citations: list[str]
    confidence: Confidence | None  # how sure the model is of this answer (uncalibrated)
    trace: list[TraceEvent]


def fresh_question_state(question: Question, images: list[str], mode: GraphMode) -> AgentState:
    """Input for a new question: every per-question field reset, ``history`` left alone."""
    return AgentState(
        mode=mode,
        question=question,
        images=images,
        findings=None,
        queries=[],
        searched=[],
        hits=[],
        evidence=[],
        round=0,
        missing=[],
        numbered=[],
        draft="",
        answer="",
        short_answer=None,
        citations=[],
        supported=False,
        unsupported_sentences=[],
        removed_citations=[],
        confidence=None,
        trace=[],
    )


# Every pydantic type that may sit in a checkpoint: the session store revives only these.
CHECKPOINT_TYPES: tuple[type[BaseModel], ...] = (
    Question,
    Turn,
    Findings,
    TextHit,
    ImageHit,
    Evidence,
    Citation,
    TraceEvent,
    Confidence,
)


@dataclass
class WrittenAnswer:
    """The answer prompt and the model's raw reply, kept for the confidence probe (which
    replays them); never checkpointed."""

    messages: list[Message] = field(default_factory=list)
    text: str = ""


@dataclass(frozen=True)
class RunContext:
    """What one run needs but must not be checkpointed: the decoded images."""

    images: list[tuple[str, Image.Image]] = field(default_factory=list)  # (file name, RGB image)
    written: WrittenAnswer = field(default_factory=WrittenAnswer)


# Replies the model is asked for (structured output schemas).


class PlanReply(BaseModel):
    queries: list[str] = Field(description="Short PubMed keyword queries")


class RereadReply(BaseModel):
    relevance: float = Field(ge=0, le=1, description="0 = irrelevant, 1 = answers the question")
    quote: str = Field(description="The one sentence of the item that matters, copied exactly")


class DecideReply(BaseModel):
    enough: bool = Field(description="The evidence is enough to answer")
    missing: list[str] = Field(default_factory=list, description="What is still missing")
    queries: list[str] = Field(default_factory=list, description="New queries for what is missing")


class ShortAnswerReply(BaseModel):
    answer: str = Field(description="The answer in the required form only")
