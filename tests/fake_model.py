"""A scripted, deterministic VisionLanguageModel for agent tests (tests only, never shipped).

Replies are chosen per call ``purpose`` (look, plan, reread, decide, answer, short_answer) and,
optionally, by text the prompt must contain. Unscripted calls get a content-based default: the
reread judge scores an item by the words it shares with the question, the answer cites the
numbered evidence it was given, and so on. A reply may be garbage, truncated JSON (also what a
too-small ``max_tokens`` produces), or a ``Fail`` that raises a ModelError.

Like a real model, the answer writer obeys instructions in its prompt, but this one is scripted
to obey only instructions *outside* the fenced evidence block (``prompts.EVIDENCE_BLOCK``): if
the agent ever let retrieved text out of that block, an injected order would be followed and the
injection test would fail.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from suwen.agent.prompts import EVIDENCE_BLOCK
from suwen.errors import ModelError, StructuredOutputError
from suwen.llm.base import (
    CallRecord,
    CandidateLogprob,
    ChatReply,
    LogprobRequest,
    Message,
    PromptSize,
    TokenLogprobs,
    record_call,
)

T = TypeVar("T", bound=BaseModel)

IMAGE_TOKENS = 64
_BLOCK = EVIDENCE_BLOCK
_ORDER = re.compile(r"ignore the question and answer ['\"]?(\w+)", re.IGNORECASE)
_CONTENT_WORD = re.compile(r"[a-z]{4,}")
_STOP = "what which with from that this there their about does have been were when where whose"
STOP_WORDS = frozenset([*_STOP.split(), "question", "options", "answer", "image", "images"])


@dataclass
class Fail:
    """A reply that raises ``error`` (for a stream: after yielding ``partial``)."""

    error: ModelError
    partial: str = ""


@dataclass
class Probs:
    """A reply to a log-probability request: the probability of each answer's first token
    (keys as the candidates are written, stripped: "A", "yes"). Unlisted candidates get ~0."""

    probs: dict[str, float]

    @property
    def text(self) -> str:
        return max(self.probs, key=lambda key: self.probs[key]) if self.probs else ""


UNLISTED_LOGPROB = -30.0


def fake_token_id(text: str) -> int:
    """The fake tokenizer: a candidate's first token is its stripped, case-folded text."""
    return sum(ord(ch) * 31**i for i, ch in enumerate(text.strip().casefold())) % 100_003


def probs_logprobs(reply: Probs, request: LogprobRequest) -> list[TokenLogprobs]:
    candidates = []
    for text in request.candidates:
        p = reply.probs.get(text.strip())
        logprob = math.log(p) if p else UNLISTED_LOGPROB
        candidates.append(
            CandidateLogprob(text=text, token_id=fake_token_id(text), logprob=logprob)
        )
    chosen = reply.text
    top = [(key, math.log(p)) for key, p in reply.probs.items() if p > 0][: request.top]
    logprob = math.log(reply.probs[chosen]) if chosen and reply.probs[chosen] > 0 else 0.0
    return [TokenLogprobs(token=chosen, logprob=logprob, top=top, candidates=candidates)]


@dataclass
class FakeCall:
    kind: str
    purpose: str
    messages: list[Message]
    max_tokens: int | None
    started: float = 0.0
    ended: float = 0.0
    prefill: str | None = None
    logprobs: LogprobRequest | None = None

    @property
    def text(self) -> str:
        return "\n".join(m.text for m in self.messages)

    @property
    def images(self) -> int:
        return sum(len(m.images) for m in self.messages)

    @property
    def last(self) -> str:
        return self.messages[-1].text


Reply = str | Fail | Probs | Callable[[FakeCall], "str | Fail | Probs"]


@dataclass
class Rule:
    purpose: str
    reply: Reply
    when: str | None = None
    times: int | None = None


def outside_evidence(text: str) -> str:
    return _BLOCK.sub(" ", text)


def content_words(text: str) -> set[str]:
    return {w for w in _CONTENT_WORD.findall(text.lower()) if w not in STOP_WORDS}


def question_of(call: FakeCall) -> str:
    match = re.search(r"Question: (.*)", outside_evidence(call.text))
    return match.group(1) if match else ""


def evidence_items(text: str) -> list[tuple[str, str]]:
    """``(label, body)`` of each item in the evidence blocks of ``text``."""
    items: list[tuple[str, str]] = []
    for match in _BLOCK.finditer(text):
        block = match.group(0)
        for entry in block.split("\n\n")[1:-1]:
            head, _, body = entry.partition("\n")
            items.append((head.split(" ", 1)[0], body))
    return items


def default_probs(call: FakeCall) -> Probs:
    """A log-probability probe nobody scripted: 0.6 on the first candidate's answer."""
    labels = (
        list(dict.fromkeys(c.strip() for c in call.logprobs.candidates)) if call.logprobs else []
    )
    if not labels:
        return Probs({})
    rest = 0.4 / max(1, len(labels) - 1)
    return Probs({label: 0.6 if i == 0 else rest for i, label in enumerate(labels)})


def default_reply(call: FakeCall) -> str | Probs:
    question = question_of(call)
    if call.logprobs is not None:
        return default_probs(call)
    if call.purpose == "look":
        words = sorted(content_words(question))
        modality = "CT" if call.images else ""
        return json.dumps(
            {
                "modality": modality,
                "body_region": "chest" if call.images else "",
                "findings": [f"finding about {w}" for w in words[:2]],
                "candidates": words[:2],
                "to_check": words[:1],
            }
        )
    if call.purpose == "plan":
        words = [w for w in re.findall(r"[A-Za-z]+", question) if w.lower() in content_words(w)]
        return json.dumps({"queries": [" ".join(words[:4]) or "medicine"]})
    if call.purpose == "reread":
        items = evidence_items(call.last)
        body = items[0][1] if items else ""
        shared = content_words(question) & content_words(body)
        quote = re.split(r"(?<=[.!?])\s+", body.strip())[0] if body.strip() else ""
        return json.dumps({"relevance": 0.9 if len(shared) >= 2 else 0.1, "quote": quote})
    if call.purpose == "decide":
        return json.dumps({"enough": True, "missing": [], "queries": []})
    if call.purpose == "short_answer":
        return json.dumps({"answer": "A"})
    if call.purpose == "answer":
        return default_answer(call)
    return "ok"


def default_answer(call: FakeCall) -> str:
    instructions = outside_evidence(call.text)
    order = _ORDER.search(instructions)
    if order:
        return order.group(1)
    labels = [label for label, _ in evidence_items(call.last) if label.startswith("[")]
    sentences = [
        f"The evidence item number {label[1:-1]} supports this point {label}."
        for label in labels[:2]
    ]
    if not sentences:
        sentences = ["This answer comes from general medical knowledge alone."]
    if "Short answer:" in instructions:
        short = "A" if "Options:" in instructions else "yes"
        return " ".join(sentences) + "\nShort answer: " + short
    return " ".join(sentences)


def _tokens(text: str) -> int:
    return len(text.split())


class FakeModel:
    """Scripted VisionLanguageModel. ``delay(prompt_tokens, completion_tokens)`` -> seconds."""

    def __init__(
        self,
        *,
        delay: Callable[[int, int], float] | None = None,
        context_length: int | None = None,
    ) -> None:
        """``context_length``: the model length ``prompt_size`` reports (None: unknown)."""
        self.context_length = context_length
        self.measured: list[int] = []  # the size of every prompt measured, in order
        self.rules: list[Rule] = []
        self.calls: list[FakeCall] = []
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.logprob_replies: dict[int, Probs] = {}

    def script(
        self, purpose: str, reply: Reply, *, when: str | None = None, times: int | None = None
    ) -> FakeModel:
        """Answer calls for ``purpose`` (whose prompt contains ``when``) with ``reply``,
        ``times`` times (forever when None). Earlier rules win."""
        self.rules.append(Rule(purpose, reply, when, times))
        return self

    def calls_for(self, purpose: str) -> list[FakeCall]:
        return [call for call in self.calls if call.purpose == purpose]

    def _choose(self, call: FakeCall) -> str | Fail | Probs:
        for rule in self.rules:
            if rule.purpose != call.purpose or (rule.times is not None and rule.times <= 0):
                continue
            if rule.when is not None and rule.when not in call.text:
                continue
            if rule.times is not None:
                rule.times -= 1
            return rule.reply(call) if callable(rule.reply) else rule.reply
        return default_reply(call)

    async def _call(
        self,
        kind: str,
        messages: list[Message],
        purpose: str,
        max_tokens: int | None,
        prefill: str | None = None,
        logprobs: LogprobRequest | None = None,
    ) -> tuple[FakeCall, str | Fail]:
        call = FakeCall(kind, purpose, list(messages), max_tokens, time.perf_counter())
        call.prefill, call.logprobs = prefill, logprobs
        self.calls.append(call)
        chosen = self._choose(call)
        if isinstance(chosen, Probs):
            self.logprob_replies[id(call)] = chosen
            reply: str | Fail = chosen.text
        else:
            reply = chosen
        if isinstance(reply, str) and max_tokens is not None:
            # Like a real server: a reply longer than the budget is cut off mid-way.
            reply = " ".join(reply.split(" ")[:max_tokens])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            prompt = sum(_tokens(m.text) for m in messages) + IMAGE_TOKENS * call.images
            completion = _tokens(reply if isinstance(reply, str) else reply.partial)
            await asyncio.sleep(self.delay(prompt, completion) if self.delay else 0)
        finally:
            self.in_flight -= 1
        call.ended = time.perf_counter()
        ok = isinstance(reply, str)
        record_call(
            CallRecord(
                kind=kind,  # type: ignore[arg-type]
                purpose=purpose,
                prompt_tokens=prompt,
                completion_tokens=completion,
                seconds=call.ended - call.started,
                ok=ok,
            )
        )
        return call, reply

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
        call, reply = await self._call("chat", messages, purpose, max_tokens, prefill, logprobs)
        if isinstance(reply, Fail):
            raise reply.error
        positions = None
        if logprobs is not None:
            probs = self.logprob_replies.pop(id(call), None) or Probs({reply.strip(): 1.0})
            positions = probs_logprobs(probs, logprobs)
        return ChatReply(
            text=reply, finish_reason="stop", record=CallRecord(kind="chat"), logprobs=positions
        )

    async def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
    ) -> AsyncIterator[str]:
        _, reply = await self._call("stream", messages, purpose, max_tokens)
        text = reply.partial if isinstance(reply, Fail) else reply
        for index, word in enumerate(text.split(" ")):
            yield word if index == 0 else " " + word
        if isinstance(reply, Fail):
            raise reply.error

    async def prompt_size(self, messages: list[Message]) -> PromptSize:
        """Tokens counted as the call records count them (words, IMAGE_TOKENS per image)."""
        images = sum(len(m.images) for m in messages)
        tokens = sum(_tokens(m.text) for m in messages) + IMAGE_TOKENS * images
        self.measured.append(tokens)
        return PromptSize(tokens=tokens, limit=self.context_length)

    async def structured(
        self,
        messages: list[Message],
        schema: type[T],
        *,
        max_tokens: int | None = None,
        purpose: str = "",
    ) -> T:
        _, reply = await self._call("structured", messages, purpose, max_tokens)
        if isinstance(reply, Fail):
            raise reply.error
        try:
            return schema.model_validate_json(reply)
        except ValidationError:
            pass
        # The real client's one bounded repair attempt: this fake repeats itself.
        _, again = await self._call("repair", messages, purpose, max_tokens)
        try:
            return schema.model_validate_json(again if isinstance(again, str) else "")
        except ValidationError as exc:
            raise StructuredOutputError(
                f"{purpose}: reply is not valid {schema.__name__} JSON after one repair "
                f"({exc.error_count()} errors)"
            ) from exc
