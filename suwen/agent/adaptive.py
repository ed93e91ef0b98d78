"""Confidence at answer time, and adaptive mode: retrieve only when the plain answer is unsure.

Every result gets the confidence its ``assess`` step measured, mapped through the calibration
file's map for its benchmark (or answer form) and mode when there is one (``calibrated``), and
is marked ``abstained`` below the ``abstain_below`` setting.

Adaptive mode answers plainly first (answer + confidence probe: two requests). At or above the
threshold (the calibration file's, learnt on dev questions, else the ``adaptive_threshold``
setting) that answer stands; below it the agent runs, and when its short answer differs from
the plain one the result says so and names the evidence it cited for the new answer. The
result's ``route`` records the path and why; its calls, tokens and trace cover both passes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from suwen.config import Settings
from suwen.evaluate.calibration import CalibrationFile
from suwen.types import AgentEvent, AgentResult, Confidence, Question, Route, TokenUsage

if TYPE_CHECKING:
    from suwen.agent.graph import EventHandler, SuwenAgent

EVIDENCE_NAMED = 2  # citations named when retrieval changed an answer
ANSWER_SHOWN = 60  # characters of an open short answer quoted in that explanation
_WORD = re.compile(r"[a-z0-9]{3,}")


def families(question: Question) -> list[str]:
    """Calibration keys for a question, most specific first: its benchmark, its answer form."""
    return [family for family in (question.family, question.answer_format.kind) if family]


def with_confidence(
    result: AgentResult,
    question: Question,
    measured: Confidence | None,
    calibration: CalibrationFile | None,
    settings: Settings,
) -> AgentResult:
    raw = measured.value if measured is not None else None
    fitted = calibration.find(families(question), result.mode) if calibration else None
    value = fitted.apply(raw) if fitted is not None and raw is not None else raw
    below = settings.abstain_below
    return result.model_copy(
        update={
            "confidence": value,
            "confidence_raw": raw,
            "confidence_source": measured.source if measured is not None else "none",
            "calibrated": fitted is not None and raw is not None,
            "answer_probabilities": measured.distribution if measured is not None else {},
            "abstained": below is not None and value is not None and value < below,
        }
    )


def threshold_for(
    question: Question, calibration: CalibrationFile | None, settings: Settings
) -> tuple[float, str]:
    learnt = calibration.threshold(families(question)) if calibration else None
    if learnt is not None:
        return learnt, "learnt by suwen eval --calibrate"
    return settings.adaptive_threshold, "setting adaptive_threshold"


def _clip(answer: str) -> str:
    answer = " ".join(answer.split())
    return answer if len(answer) <= ANSWER_SHOWN else answer[: ANSWER_SHOWN - 1] + "…"


def _mentions(text: str, answer_text: str) -> int:
    wanted = set(_WORD.findall(answer_text.casefold()))
    return len(wanted & set(_WORD.findall(text.casefold())))


def explain_change(question: Question, plain: AgentResult, agent: AgentResult) -> str | None:
    """ "retrieval changed the answer from B to D because of [2]", or None when it did not."""
    before, after = plain.short_answer, agent.short_answer
    if not before or not after or before.strip().casefold() == after.strip().casefold():
        return None
    answer_text = question.answer_format.options.get(after, after)
    relevance = {item.key: item.relevance for item in agent.evidence}
    texts = {item.key: f"{item.quote} {item.hit.text}" for item in agent.evidence}
    ranked = sorted(
        agent.citations,
        key=lambda c: (_mentions(texts.get(c.key, c.quote), answer_text), relevance.get(c.key, 0)),
        reverse=True,
    )
    change = f"retrieval changed the answer from {_clip(before)} to {_clip(after)}"
    if not ranked:
        return change + " (the new answer cites no evidence)"
    named = "".join(f"[{c.number}]" for c in ranked[:EVIDENCE_NAMED])
    return f"{change} because of {named}"


def _plain_route(plain: AgentResult, threshold: float, origin: str) -> Route:
    confidence = plain.confidence
    assert confidence is not None
    return Route(
        path="plain",
        reason=f"plain answer confidence {confidence:.2f} >= threshold {threshold:.2f} ({origin})",
        threshold=threshold,
        plain_answer=plain.short_answer,
        plain_confidence=confidence,
    )


def _escalation_reason(plain: AgentResult, threshold: float, origin: str) -> str:
    if plain.confidence is None:
        return "the plain answer's confidence could not be measured; retrieving"
    return (
        f"plain answer confidence {plain.confidence:.2f} < threshold {threshold:.2f} "
        f"({origin}); retrieving"
    )


def combined(plain: AgentResult, agent: AgentResult, route: Route) -> AgentResult:
    """The agent's answer, accounted for with both passes."""
    tokens = TokenUsage(
        prompt=plain.tokens.prompt + agent.tokens.prompt,
        completion=plain.tokens.completion + agent.tokens.completion,
    )
    timings = dict(agent.timings)
    timings["plain pass"] = plain.timings.get("total", 0.0)
    timings["total"] = plain.timings.get("total", 0.0) + agent.timings.get("total", 0.0)
    plain_trace = [
        event.model_copy(update={"node": f"plain {event.node}"}) for event in plain.trace
    ]
    return agent.model_copy(
        update={
            "mode": "adaptive",
            "model_calls": plain.model_calls + agent.model_calls,
            "tokens": tokens,
            "timings": timings,
            "trace": [*plain_trace, *agent.trace],
            "route": route,
        }
    )


async def run_adaptive(
    agent: SuwenAgent,
    question: Question,
    thread_id: str | None,
    on_event: EventHandler | None,
) -> AgentResult:
    history = await agent.history(thread_id) if thread_id is not None else None
    plain = await agent.run_mode(question, "plain", thread_id, on_event)
    threshold, origin = threshold_for(question, agent.calibration, agent.settings)
    if plain.confidence is not None and plain.confidence >= threshold:
        return plain.model_copy(
            update={"mode": "adaptive", "route": _plain_route(plain, threshold, origin)}
        )
    reason = _escalation_reason(plain, threshold, origin)
    if on_event is not None:
        on_event(AgentEvent(kind="info", node="adaptive", message=reason))
    # The agent's turn replaces the plain one in the conversation.
    searched = await agent.run_mode(question, "agent", thread_id, on_event, history=history)
    route = Route(
        path="agent",
        reason=reason,
        threshold=threshold,
        plain_answer=plain.short_answer,
        plain_confidence=plain.confidence,
        changed=explain_change(question, plain, searched),
    )
    return combined(plain, searched, route)
