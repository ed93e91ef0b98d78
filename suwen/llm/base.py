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
    image_labels: list[str] = Field(
        default_factory=list,
        description="Text sent just before each image, in order (MedEvalKit's '<image_i>: '); "
        "empty: the images go first, unlabelled",
    )


# What a request to the model server was: a reply, a streamed reply, a structured reply, or
# the one repair attempt after a structured reply that did not validate.
CallKind = Literal["chat", "stream", "structured", "repair"]


class CallRecord(BaseModel):
    """Accounting for one model request."""

    kind: CallKind
    purpose: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    url: str = ""
    ok: bool = True


class LogprobRequest(BaseModel):
    """Token log-probabilities wanted with a reply (what confidence is computed from).

    ``candidates`` are texts (" A", "yes", ...) whose FIRST token's log-probability is wanted
    at every generated position, whether or not it is among the most likely tokens; ``top``
    asks for that many most likely tokens as well."""

    candidates: list[str] = Field(default_factory=list)
    top: int = Field(0, ge=0, le=20)


class CandidateLogprob(BaseModel):
    text: str = Field(description="The candidate as requested")
    token_id: int = Field(description="Its first token (candidates sharing it share the mass)")
    logprob: float


class TokenLogprobs(BaseModel):
    """One generated position: the token chosen and the alternatives asked for."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = Field(default_factory=list)
    candidates: list[CandidateLogprob] = Field(default_factory=list)


class ChatReply(BaseModel):
    text: str
    finish_reason: str | None = None
    record: CallRecord
    logprobs: list[TokenLogprobs] | None = Field(
        None, description="Per generated token, when a LogprobRequest asked for them"
    )


class PromptSize(BaseModel):
    """How many tokens a prompt takes on the server, and how many the served model admits."""

    tokens: int
    limit: int | None = Field(None, description="The served model's max_model_len (None: unknown)")


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
        prefill: str | None = None,
        logprobs: LogprobRequest | None = None,
    ) -> ChatReply:
        """``prefill``: the reply starts with this text and the model continues it (the
        position after it is what a confidence probe scores); ``logprobs``: token
        log-probabilities to return with the reply."""
        ...

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


@runtime_checkable
class PromptMeasure(Protocol):
    """A model that can say how long a prompt is before it is sent (the answer prompt is fitted
    to the model length with it; a model without it is sent the prompt as built)."""

    async def prompt_size(self, messages: list[Message]) -> PromptSize: ...
