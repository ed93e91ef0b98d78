"""The one interface the agent uses to talk to a vision-language model.

The real implementation (``suwen.llm.client.VLLMClient``) talks to vLLM's OpenAI-compatible
server; tests use a scripted fake behind the same protocol. Every call is recorded in the
``CallLog`` active in the caller's context, so concurrent questions keep separate accounts.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Literal, Protocol, TypeVar, runtime_checkable

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T", bound=BaseModel)


class Message(BaseModel):
    """One chat turn: text plus any images (already decoded to RGB by ``suwen.medimage``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    role: Literal["system", "user", "assistant"]
    text: str
    images: list[Image.Image] = Field(default_factory=list)


class CallRecord(BaseModel):
    """Accounting for one model request."""

    kind: Literal["chat", "stream", "structured", "repair"]
    purpose: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    url: str = ""
    ok: bool = True


class ChatReply(BaseModel):
    text: str
    finish_reason: str | None = None
    record: CallRecord


class CallLog:
    """Collects the CallRecords of the calls made while it is active (see ``recording``)."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.records)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.records)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)


_current_logs: contextvars.ContextVar[tuple[CallLog, ...]] = contextvars.ContextVar(
    "suwen_call_logs", default=()
)


@contextmanager
def recording() -> Iterator[CallLog]:
    """Record every model call made in this context (and tasks it starts) into a new CallLog.

    Logs nest: a call is recorded in every enclosing log, so a batch total and a per-question
    account can both be kept.
    """
    log = CallLog()
    token = _current_logs.set((*_current_logs.get(), log))
    try:
        yield log
    finally:
        _current_logs.reset(token)


def record_call(record: CallRecord) -> None:
    """Called by model clients after every request."""
    for log in _current_logs.get():
        log.records.append(record)


@runtime_checkable
class VisionLanguageModel(Protocol):
    """What the agent needs from a model. Implementations must record every call."""

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
    ) -> ChatReply: ...

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
    ) -> AsyncIterator[str]: ...

    async def structured(
        self,
        messages: list[Message],
        schema: type[T],
        *,
        max_tokens: int | None = None,
        purpose: str = "",
    ) -> T:
        """Reply validated against ``schema``; one bounded repair attempt on invalid or
        truncated JSON, then ``suwen.errors.StructuredOutputError``."""
        ...
