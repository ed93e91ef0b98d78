"""The agent's steps. Each returns a ``Step``: a partial state update plus one line for the trace.

A step whose model call fails (``ModelError``, including garbage or truncated JSON surfacing as
``StructuredOutputError``) or whose search tool fails (``SuwenError``, ``OSError``) does not
stop the run: it returns what it can without that part and marks itself degraded. Routing
functions are named for the decision they make.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from suwen.agent import prompts
from suwen.agent.answers import (
    check_citations,
    clean_queries,
    grounded_quote,
    normalize_short_answer,
    short_answer_of,
    uncited_claims,
)
from suwen.agent.budget import FittedPrompt, fit_answer_prompt
from suwen.agent.confidence import answer_confidence
from suwen.agent.examples import CaseExample, example_candidates, load_examples
from suwen.agent.state import (
    AgentState,
    DecideReply,
    PlanReply,
    RereadReply,
    RunContext,
    ShortAnswerReply,
    Turn,
)
from suwen.config import Settings
from suwen.errors import ModelError, SuwenError
from suwen.llm.base import Message, VisionLanguageModel
from suwen.models import local_copy
from suwen.sanitize import register_model
from suwen.tools.cases import ImageSearch, similar_cases
from suwen.tools.pubmed import TextSearch, search_pubmed
from suwen.types import AgentEvent, Evidence, Findings, Hit, Question, TraceEvent

Emit = Callable[[AgentEvent], None]
NodeName = Literal["look", "plan", "retrieve", "reread", "decide", "answer", "verify", "assess"]
SEARCH_FAILURES = (SuwenError, OSError)
TRACE_ITEM_CHARS = 80


@dataclass
class Step:
    update: AgentState
    message: str
    degraded: bool = False


StepFunction = Callable[[AgentState, RunContext, Emit], Awaitable[Step]]


async def traced_update(
    name: str, step: StepFunction, state: AgentState, context: RunContext, emit: Emit
) -> AgentState:
    """Run one step, timed: its update with its trace event (which the reducer appends)."""
    started = time.perf_counter()
    done = await step(state, context, emit)
    seconds = time.perf_counter() - started
    event = TraceEvent(node=name, message=done.message, seconds=seconds, degraded=done.degraded)
    return {**done.update, "trace": [event]}


def _images(context: RunContext) -> list[Image.Image]:
    return [image for _, image in context.images]


def _clip(text: str, limit: int = TRACE_ITEM_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(items: Sequence[str], limit: int = 3) -> str:
    """A few items for a trace line, each clipped: the model's strings can be any length."""
    shown = "; ".join(_clip(item) for item in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _merge_hits(known: set[str], batches: Sequence[Sequence[Hit]]) -> list[Hit]:
    """One hit per key (first seen wins its rank), skipping keys judged in an earlier round;
    duplicates add their provenance and retrievers instead of vanishing."""
    merged: dict[str, Hit] = {}
    for batch in batches:
        for hit in batch:
            if hit.key in known:
                continue
            first = merged.get(hit.key)
            if first is None:
                merged[hit.key] = hit
                continue
            merged[hit.key] = first.model_copy(
                update={
                    "score": max(first.score, hit.score),
                    "found_by": list(dict.fromkeys([*first.found_by, *hit.found_by])),
                    "methods": list(dict.fromkeys([*first.methods, *hit.methods])),
                }
            )
    return list(merged.values())


def kept_evidence(state: AgentState) -> list[Evidence]:
    return [item for item in state["evidence"] if item.kept]


def start_message(node: NodeName, state: AgentState, context: RunContext) -> str:
    """What the chat shows while a step runs."""
    if node == "look":
        return "looking at the image" if context.images else "reading the question"
    if node == "retrieve":
        queries = state["queries"]
        cases = bool(context.images) and state["round"] == 0
        if not queries:
            return "searching similar cases" if cases else "nothing to search"
        return f"searching PubMed: {_short(queries)}" + (" and similar cases" if cases else "")
    if node == "reread":
        return f"rereading {len(state['hits'])} passages"
    return {
        "plan": "planning searches",
        "decide": "checking whether the evidence is enough",
        "answer": "writing the answer",
        "verify": "checking citations",
        "assess": "weighing the answer",
    }[node]


class AgentNodes:
    """The steps, bound to one model, its settings and the search tools present (None = absent)."""

    def __init__(
        self,
        settings: Settings,
        model: VisionLanguageModel,
        text_search: TextSearch | None,
        image_search: ImageSearch | None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.text_search = text_search
        self.image_search = image_search
        # Untrusted text in prompts must not spell any special token of the served tokenizer
        # (read from the model's folder: as given, fetched into the data home, or HF-cached).
        register_model(local_copy(settings.vlm, settings, "text") or settings.vlm)

    def _history(self, state: AgentState) -> list[Message]:
        return prompts.history_messages(state["history"], self.settings.history_turns)

    # -- look -----------------------------------------------------------------------------

    async def look(self, state: AgentState, context: RunContext, emit: Emit) -> Step:
        messages = prompts.look_messages(state["question"], _images(context), self._history(state))
        try:
            findings = await self.model.structured(
                messages, Findings, max_tokens=prompts.LOOK_MAX_TOKENS, purpose="look"
            )
        except ModelError as exc:
            return Step({"findings": None}, f"no findings ({exc}); going on without", True)
        seen = _short([p for p in (findings.modality, findings.body_region) if p]) or "question"
        candidates = _short(findings.candidates) if findings.candidates else "none named"
        return Step({"findings": findings}, f"{seen}; candidates: {candidates}")

    # -- plan -----------------------------------------------------------------------------

    async def plan(self, state: AgentState, context: RunContext, emit: Emit) -> Step:
        if self.text_search is None:
            return Step({"queries": []}, "no PubMed index: PubMed search is not available")
        question = state["question"]
        messages = prompts.plan_messages(
            question, state["findings"], self._history(state), self.settings.max_queries
        )
        limit = self.settings.max_queries
        try:
            reply = await self.model.structured(
                messages, PlanReply, max_tokens=prompts.PLAN_MAX_TOKENS, purpose="plan"
            )
        except ModelError as exc:
            fallback = clean_queries([question.text], 1)
            return Step({"queries": fallback}, f"no plan ({exc}); searching the question", True)
        queries = clean_queries(reply.queries, limit)
        if not queries:
            fallback = clean_queries([question.text], 1)
            return Step({"queries": fallback}, "empty plan; searching the question", True)
        return Step({"queries": queries}, f"queries: {_short(queries)}")

    # -- retrieve -------------------------------------------------------------------------

    def _searches(
        self, state: AgentState, context: RunContext, queries: list[str]
    ) -> tuple[list[Awaitable[Sequence[Hit]]], list[str]]:
        """The searches this round runs, and notes on the tools that are absent."""
        question: Question = state["question"]
        searches: list[Awaitable[Sequence[Hit]]] = []
        notes: list[str] = []
        first_round = state["round"] == 0
        if context.images and first_round:
            if self.image_search is None:
                notes.append("no image index: similar cases not searched")
            else:
                searches.append(
                    similar_cases(
                        self.image_search,
                        context.images,
                        k=self.settings.image_k,
                        exclude_sha256=question.exclude_image_sha256,
                    )
                )
        if self.text_search is not None:
            text_search = self.text_search
            searches.extend(
                search_pubmed(
                    text_search,
                    q,
                    k=self.settings.text_k,
                    exclude_pmids=question.exclude_pmids,
                    method=self.settings.text_method,
                )
                for q in queries
            )
        elif first_round:
            notes.append("no PubMed index: literature not searched")
        return searches, notes

    async def retrieve(self, state: AgentState, context: RunContext, emit: Emit) -> Step:
        searched = state["searched"]
        queries = [q for q in state["queries"] if q not in searched]
        searches, notes = self._searches(state, context, queries)
        results = await asyncio.gather(*searches, return_exceptions=True)
        batches: list[Sequence[Hit]] = []
        failures: list[str] = []
        for result in results:
            if isinstance(result, SEARCH_FAILURES):
                failures.append(str(result))
            elif isinstance(result, BaseException):
                raise result  # a bug, not a missing or broken index: let it surface
            else:
                batches.append(result)
        known = {item.key for item in state["evidence"]}
        hits = _merge_hits(known, batches)
        cases = sum(hit.kind == "image" for hit in hits)
        summary = f"{len(hits) - cases} new passages from {len(queries)} queries, {cases} cases"
        message = "; ".join([summary, *notes, *(f"search failed: {f}" for f in failures)])
        update = AgentState(hits=hits, searched=queries, queries=[], round=state["round"] + 1)
        return Step(update, message, bool(failures))

    # -- reread ---------------------------------------------------------------------------

    async def _judge(self, prefix: list[Message], hit: Hit) -> Evidence | None:
        try:
            reply = await self.model.structured(
                prompts.reread_item(prefix, hit),
                RereadReply,
                max_tokens=prompts.REREAD_MAX_TOKENS,
                purpose="reread",
            )
        except ModelError:
            return None
        kept = reply.relevance >= self.settings.relevance_threshold
        quote = grounded_quote(reply.quote, hit.text)
        return Evidence(key=hit.key, hit=hit, relevance=reply.relevance, quote=quote, kept=kept)

    async def reread(self, state: AgentState, context: RunContext, emit: Emit) -> Step:
        hits = state["hits"]
        if not hits:
            return Step({"hits": []}, "nothing new to reread")
        prefix = prompts.reread_prefix(
            state["question"], _images(context), state["findings"], self._history(state)
        )
        # The first request alone fills the server's prefix cache; the rest then share it.
        first = await self._judge(prefix, hits[0])
        gate = asyncio.Semaphore(self.settings.concurrency)

        async def judge_gated(hit: Hit) -> Evidence | None:
            async with gate:
                return await self._judge(prefix, hit)

        rest = await asyncio.gather(*(judge_gated(hit) for hit in hits[1:]))
        judged = [item for item in (first, *rest) if item is not None]
        failed = len(hits) - len(judged)
        kept = sum(item.kept for item in judged)
        message = f"kept {kept} of {len(hits)} (relevance >= {self.settings.relevance_threshold})"
        if failed:
            message += f"; judging failed for {failed}, left out"
        return Step({"evidence": judged, "hits": []}, message, failed > 0)

    # -- decide ---------------------------------------------------------------------------

    async def decide(self, state: AgentState, context: RunContext, emit: Emit) -> Step:
        done, budget = state["round"], self.settings.rounds
        kept = kept_evidence(state)
        if done >= budget:
            return Step({"queries": []}, f"round budget reached ({done}/{budget}); answering")
        if self.text_search is None:
            return Step({"queries": []}, "nothing more to search; answering")
        searched = state["searched"]
        messages = prompts.decide_messages(
            state["question"],
            state["findings"],
            searched,
            [(item.hit, item.quote) for item in kept],
            self._history(state),
            self.settings.max_queries,
        )
        try:
            reply = await self.model.structured(
                messages, DecideReply, max_tokens=prompts.DECIDE_MAX_TOKENS, purpose="decide"
            )
        except ModelError as exc:
            return Step({"queries": []}, f"could not judge ({exc}); answering", True)
        if reply.enough and kept:
            return Step({"queries": [], "missing": []}, f"enough: {len(kept)} items kept")
        queries = clean_queries(reply.queries, self.settings.max_queries, already=searched)
        if not queries:
            return Step({"queries": [], "missing": reply.missing}, "no new queries; answering")
        message = f"missing: {_short(reply.missing) or 'more evidence'}; next: {_short(queries)}"
        return Step({"queries": queries, "missing": reply.missing}, message)

    # -- answer ---------------------------------------------------------------------------

    async def _generate(
        self, messages: list[Message], context: RunContext, emit: Emit
    ) -> tuple[str, str | None]:
        return await generate_text(
            self.model, self.settings, messages, "answer", emit, stream=context.stream
        )

    async def _short_answer_fallback(self, question: Question, explanation: str) -> str | None:
        """Ask for the short answer on its own, when the answer did not end with one."""
        try:
            reply = await self.model.structured(
                prompts.short_answer_messages(question, explanation),
                ShortAnswerReply,
                max_tokens=prompts.SHORT_ANSWER_MAX_TOKENS,
                purpose="short_answer",
            )
        except ModelError:
            return None
        return normalize_short_answer(reply.answer, question.answer_format)

    async def _answer_prompt(
        self, state: AgentState, context: RunContext, plain: bool
    ) -> FittedPrompt:
        """The answer prompt: the most relevant kept evidence and, before the question's own
        images, the kept cases as worked examples; fitted to the model length."""
        ranked = sorted(kept_evidence(state), key=lambda item: item.relevance, reverse=True)
        numbered = [] if plain else ranked[: self.settings.answer_evidence]
        examples = await load_examples(
            example_candidates(
                numbered,
                self.settings.case_examples,
                len(context.images),
                self.settings.vllm_max_images,
            )
        )

        def build(shown: list[CaseExample], evidence: list[Evidence]) -> list[Message]:
            return prompts.answer_messages(
                state["question"],
                _images(context),
                state["findings"],
                [item.hit for item in evidence],
                self._history(state),
                plain=plain,
                examples=[(e.number, e.case_id, e.image) for e in shown],
            )

        return await fit_answer_prompt(
            self.model, build, examples, numbered, self.settings.max_tokens
        )

    async def answer(self, state: AgentState, context: RunContext, emit: Emit) -> Step:
        question = state["question"]
        fitted = await self._answer_prompt(state, context, state["mode"] == "plain")
        messages, examples, numbered = fitted.messages, fitted.examples, fitted.numbered
        text, failure = await self._generate(messages, context, emit)
        context.written.messages, context.written.text = messages, text
        explanation, short = short_answer_of(text, question.answer_format)
        notes = [f"{len(text.split())} words, {len(numbered)} numbered sources"]
        if examples:
            notes.append(f"{len(examples)} similar cases shown as worked examples")
        if fitted.note:
            notes.append(fitted.note)
        if failure:
            notes.append(f"answer broke off: {failure}")
        if question.answer_format.kind != "free" and short is None:
            short = await self._short_answer_fallback(question, explanation or text)
            notes.append("short answer asked separately" if short else "no short answer")
        update = AgentState(
            draft=explanation, short_answer=short, numbered=[item.key for item in numbered]
        )
        degraded = failure is not None or (question.answer_format.kind != "free" and not short)
        return Step(update, "; ".join(notes), degraded)

    # -- verify ---------------------------------------------------------------------------

    async def verify(self, state: AgentState, context: RunContext, emit: Emit) -> Step:
        numbered = state["numbered"]
        by_key = {item.key: item for item in state["evidence"]}
        checked = check_citations(state["draft"], len(numbered))
        citations = [by_key[numbered[n - 1]].citation(n) for n in checked.cited]
        unsupported = uncited_claims(checked.text)
        supported = bool(citations) and not unsupported
        question = state["question"]
        turn = Turn(
            question=question.text,
            answer=checked.text,
            short_answer=state["short_answer"],
            images=state["images"],
        )
        update = AgentState(
            answer=checked.text,
            citations=citations,
            supported=supported,
            unsupported_sentences=unsupported,
            removed_citations=checked.removed,
            history=[turn],
        )
        message = f"{len(citations)} citations valid, {len(checked.removed)} removed, "
        message += f"{len(unsupported)} sentences uncited; supported={supported}"
        return Step(update, message)

    # -- assess ---------------------------------------------------------------------------

    async def assess(self, state: AgentState, context: RunContext, emit: Emit) -> Step:
        """How sure the model is of the answer (one probe request; see agent/confidence.py)."""
        if not self.settings.confidence:
            return Step({"confidence": None}, "confidence not measured (setting confidence off)")
        question = state["question"]
        if not state["answer"] and not state["short_answer"]:
            return Step({"confidence": None}, "no answer to weigh")
        measured = await answer_confidence(
            self.model,
            messages=context.written.messages,
            reply=context.written.text,
            short=state["short_answer"],
            answer_format=question.answer_format,
            question=question.text,
            images=_images(context),
            answer=state["answer"],
            history=self._history(state),
        )
        if measured.value is None:
            return Step({"confidence": measured}, f"confidence unknown: {measured.note}", True)
        message = f"confidence {measured.value:.2f} ({measured.source}, uncalibrated)"
        return Step({"confidence": measured}, message)


# -- routing ------------------------------------------------------------------------------


def look_or_answer_plainly(state: AgentState) -> Literal["look", "answer"]:
    """Agent mode starts by looking; plain mode (the baseline) answers straight away."""
    return "answer" if state["mode"] == "plain" else "look"


def search_again_or_answer(state: AgentState) -> Literal["retrieve", "answer"]:
    """decide leaves new queries only when the evidence is short and the budget allows."""
    return "retrieve" if state["queries"] else "answer"


async def generate_text(
    model: VisionLanguageModel,
    settings: Settings,
    messages: list[Message],
    node: str,
    emit: Emit,
    *,
    stream: bool,
) -> tuple[str, str | None]:
    """The text of one generation step (``node``: the answer or the report) and what went
    wrong, if anything. With ``stream`` (someone is listening) it comes token by token, each
    piece passed on as a token event, and what came before a break is kept. Without, it is
    asked for in one reply: a stream costs the client the parsing of one event per token and
    the server the writing of it, which a batch or an evaluation would pay for nothing; a
    failed reply is retried whole by the client instead."""
    if not stream:
        try:
            reply = await model.chat(
                messages,
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                purpose=node,
            )
        except ModelError as exc:
            return "", str(exc)
        return reply.text, None
    pieces: list[str] = []
    try:
        async for piece in model.stream(
            messages,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            purpose=node,
        ):
            pieces.append(piece)
            emit(AgentEvent(kind="token", node=node, token=piece))
    except ModelError as exc:
        return "".join(pieces), str(exc)
    return "".join(pieces), None
