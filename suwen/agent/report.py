"""Draft radiology reports: ``suwen report``'s path through the agent's steps.

    look -> plan -> retrieve -> reread -> write report -> check citations
    (plain mode: write report -> check citations, no references)

One retrieval round (a report is not a question to research): the similar cases the reread
kept, most relevant first and ahead of article passages, become the numbered references whose
reports or captions the model may borrow from, citing each borrowed statement. As in answers,
citations that point at no reference are removed and findings or impression sentences that
cite none are flagged; the report is split into its sections for ``--json``.
"""

from __future__ import annotations

import asyncio
import re
import time

from suwen.agent import prompts
from suwen.agent.answers import check_citations, uncited_claims
from suwen.agent.budget import FittedPrompt, fit_answer_prompt
from suwen.agent.examples import CaseExample
from suwen.agent.graph import (
    EventHandler,
    SuwenAgent,
    check_image_budget,
    load_question_images,
)
from suwen.agent.nodes import StepFunction, generate_text, kept_evidence, traced_update
from suwen.agent.state import AgentState, RunContext, fresh_question_state, merged_state
from suwen.llm.base import Message, recording
from suwen.privacy import no_tracing
from suwen.types import (
    AgentEvent,
    AgentResult,
    DraftReport,
    Evidence,
    Question,
    ReportFinding,
    TokenUsage,
    TraceEvent,
)

_HEADING = re.compile(
    r"^[\s#*_]*(" + "|".join(prompts.REPORT_SECTIONS) + r")\b[\s*_]*:?[\s*_]*(.*)$",
    re.IGNORECASE,
)
_REGION = re.compile(r"^\s*(?:[-*•]|\d+[.)])?\s*([A-Za-z][\w /,&()-]{0,40}?)\s*:\s+(.+)$")


def references(evidence: list[Evidence], limit: int) -> list[Evidence]:
    """The kept similar cases (most relevant first), then kept passages, ``limit`` in all."""
    ranked = sorted(evidence, key=lambda item: item.relevance, reverse=True)
    cases = [item for item in ranked if item.hit.kind == "image"]
    passages = [item for item in ranked if item.hit.kind != "image"]
    return [*cases, *passages][:limit]


def parse_report(text: str) -> dict[str, str]:
    """Section name (lower case) -> its text; a report without headings is all findings."""
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading is not None:
            current = heading.group(1).lower()
            sections.setdefault(current, [])
            line = heading.group(2)
        if current is None:
            current = "findings"
            sections.setdefault(current, [])
        if line.strip():
            sections[current].append(line.rstrip())
    return {name: "\n".join(lines).strip() for name, lines in sections.items()}


def region_findings(text: str) -> list[ReportFinding]:
    """'- Lungs: clear.' lines as (region, text); other lines keep an empty region."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _REGION.match(line)
        if match is not None:
            rows.append(ReportFinding(region=match.group(1).strip(), text=match.group(2).strip()))
        else:
            rows.append(ReportFinding(text=re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line)))
    return rows


async def draft_report(
    agent: SuwenAgent, question: Question, *, plain: bool, on_event: EventHandler | None = None
) -> DraftReport:
    """Draft the report of ``question``'s images (priors in ``question.prior_images``)."""
    notify = on_event or (lambda event: None)
    settings = agent.settings
    images = await asyncio.to_thread(
        load_question_images,
        list(question.images),
        settings.volume_slices,
        question.text,
        list(question.prior_images),
        dict(question.image_dates),
    )
    check_image_budget(images, settings.vllm_max_images)
    context = RunContext(images=images, stream=on_event is not None)
    state = fresh_question_state(question, list(question.images), "plain" if plain else "agent")
    state["history"] = []  # a report is not part of a conversation
    with recording() as log, no_tracing():
        if not plain:
            nodes = agent.nodes
            for name, step in (
                ("look", nodes.look),
                ("plan", nodes.plan),
                ("retrieve", nodes.retrieve),
                ("reread", nodes.reread),
            ):
                state = await _run(name, step, state, context, notify)
        report = await _write(agent, state, context, plain, notify)
    report.model_calls = log.calls
    report.tokens = TokenUsage(prompt=log.prompt_tokens, completion=log.completion_tokens)
    return report


async def _run(
    name: str,
    step: StepFunction,
    state: AgentState,
    context: RunContext,
    notify: EventHandler,
) -> AgentState:
    notify(AgentEvent(kind="node_start", node=name, message=name))
    update = await traced_update(name, step, state, context, notify)
    notify(AgentEvent(kind="node_end", node=name, message=update["trace"][0].message))
    return merged_state(state, update)


async def _write(
    agent: SuwenAgent,
    state: AgentState,
    context: RunContext,
    plain: bool,
    notify: EventHandler,
) -> DraftReport:
    notify(AgentEvent(kind="node_start", node="report", message="writing the report"))
    started = time.perf_counter()
    fitted = await _report_prompt(agent, state, context, plain)
    messages, numbered = fitted.messages, fitted.numbered
    text, failure = await generate_text(
        agent.model, agent.settings, messages, "report", notify, stream=context.stream
    )
    checked = check_citations(text, len(numbered))
    sections = parse_report(checked.text)
    claims = "\n".join([sections.get("findings", ""), sections.get("impression", "")])
    message = f"{len(checked.cited)} references cited, {len(checked.removed)} removed"
    if fitted.note:
        message += f"; {fitted.note}"
    if failure:
        message += f"; report broke off: {failure}"
    trace = [
        *state["trace"],
        TraceEvent(
            node="report",
            message=message,
            seconds=time.perf_counter() - started,
            degraded=failure is not None,
        ),
    ]
    return DraftReport(
        images=list(state["question"].images),
        prior_images=list(state["question"].prior_images),
        mode="plain" if plain else "agent",
        technique=sections.get("technique", ""),
        comparison=sections.get("comparison", ""),
        findings=region_findings(sections.get("findings", "")),
        impression=sections.get("impression", ""),
        text=checked.text,
        citations=[numbered[n - 1].citation(n) for n in checked.cited],
        evidence=state["evidence"],
        unsupported_sentences=uncited_claims(claims),
        removed_citations=checked.removed,
        reading=state["findings"],
        trace=trace,
        degraded=any(event.degraded for event in trace),
    )


async def _report_prompt(
    agent: SuwenAgent, state: AgentState, context: RunContext, plain: bool
) -> FittedPrompt:
    """The report prompt with as many references (least relevant left out first) as fit the
    model length beside the report's max_tokens."""
    numbered = [] if plain else references(kept_evidence(state), agent.settings.answer_evidence)

    def build(_: list[CaseExample], shown: list[Evidence]) -> list[Message]:
        return prompts.report_messages(
            [image for _, image in context.images],
            state["findings"],
            [item.hit for item in shown],
            plain=plain,
            indication=_indication(state["question"]),
        )

    return await fit_answer_prompt(agent.model, build, [], numbered, agent.settings.max_tokens)


def _indication(question: Question) -> str:
    return "" if question.text.strip() == prompts.REPORT_TASK else question.text


def as_agent_result(draft: DraftReport, question: Question) -> AgentResult:
    """A report as one batch line: the report text is the answer, its impression the short
    answer (``--task report``; the sections can be read back with ``parse_report``)."""
    return AgentResult(
        question=question.text,
        mode=draft.mode,
        answer=draft.text,
        short_answer=draft.impression or None,
        citations=draft.citations,
        evidence=draft.evidence,
        findings=draft.reading,
        model_calls=draft.model_calls,
        tokens=draft.tokens,
        supported=bool(draft.citations) and not draft.unsupported_sentences,
        unsupported_sentences=draft.unsupported_sentences,
        removed_citations=draft.removed_citations,
        trace=draft.trace,
    )
