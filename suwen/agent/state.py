"""The agent's typed state, the replies it asks the model for, and what one run needs at hand.

``AgentState`` is what LangGraph checkpoints: plain data and pydantic models only (loaded
images live in ``RunContext``, which is never persisted). ``history`` outlives a question, so a
follow-up in the same thread sees the conversation; every other field is reset when a new
question starts (see ``fresh_question_state``).

A step returns a partial update. Fields annotated with ``operator.add`` (LangGraph's reducer
convention) are appended to: a step returns only its new items, and starting a question
replaces them (``graph_input``) instead of appending the new question's empty lists.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict, cast, get_args, get_origin, get_type_hints

from langgraph.types import Overwrite
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


# total=False so that a step's partial update is an AgentState too. A running graph's state
# has every field: a question starts with all of them (fresh_question_state), and the
# appended ones (history included) start as empty lists. Steps read them with state[...].
class AgentState(TypedDict, total=False):
    mode: GraphMode
    question: Question
    images: list[str]  # image paths in effect: this question's, else the conversation's
    # Earlier turns of this thread (persisted across questions).
    history: Annotated[list[Turn], operator.add]
    findings: Findings | None  # what look read off the image(s) and question
    queries: list[str]  # queries the next retrieval runs
    searched: Annotated[list[str], operator.add]  # every query already run for this question
    hits: list[Hit]  # hits of the latest retrieval, not yet reread
    # Every reread item, kept or dropped, with its score.
    evidence: Annotated[list[Evidence], operator.add]
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
    trace: Annotated[list[TraceEvent], operator.add]  # one event per step run


def _reducers() -> dict[str, Callable[[Any, Any], Any]]:
    """The fields LangGraph appends to, with their reducer, as AgentState declares them."""
    hints = get_type_hints(AgentState, include_extras=True)
    return {
        name: get_args(hint)[1]
        for name, hint in hints.items()
        if get_origin(hint) is Annotated and callable(get_args(hint)[1])
    }


APPENDED = _reducers()


def merged_state(state: AgentState, update: AgentState) -> AgentState:
    """``update`` applied to ``state`` as the graph applies it (appended fields reduced), for
    code that runs steps outside the graph (the report draft)."""
    result: dict[str, Any] = dict(state)
    for name, value in update.items():
        reduce = APPENDED.get(name)
        result[name] = reduce(result[name], value) if reduce and name in result else value
    return cast(AgentState, result)


def graph_input(state: AgentState) -> AgentState:
    """``state`` as the input of a run: its appended fields replace the thread's instead of
    being appended to them (LangGraph's ``Overwrite`` bypasses the reducer)."""
    start: dict[str, Any] = {
        name: Overwrite(value) if name in APPENDED else value for name, value in state.items()
    }
    return cast(AgentState, start)


def fresh_question_state(question: Question, images: list[str], mode: GraphMode) -> AgentState:
    """The state a new question starts from: every per-question field empty (given to the graph
    through ``graph_input``, so the empty lists replace what the last question left), and
    ``history`` left to the thread."""
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
    """What one run needs but must not be checkpointed: the decoded images, and whether the
    answer is streamed (someone listens to the run: ask, chat, report) or comes in one reply
    (batch, evaluation)."""

    images: list[tuple[str, Image.Image]] = field(default_factory=list)  # (file name, RGB image)
    stream: bool = False
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
