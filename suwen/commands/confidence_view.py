"""How sure Suwen is, in the terminal: the abstention notice, the confidence line, the route.

Shared by ``suwen ask`` and ``suwen chat`` (through ``answer_view``). Every value shown here is
Suwen's own (numbers and fixed words); the route's explanation quotes only short answers and
citation numbers.
"""

from __future__ import annotations

from rich.console import RenderableType
from rich.text import Text

from suwen.types import AgentResult

SOURCE_WORDS = {
    "option-probability": "the model's probability for the option letters",
    "yes-no-probability": "the model's probability for yes/no",
    "self-check": "the model's self-check of its answer",
}


def abstention_notice(result: AgentResult) -> Text | None:
    """The first line of an answer Suwen is not confident enough to give."""
    if not result.abstained or result.confidence is None:
        return None
    return Text(
        f"Suwen is not confident enough to answer (confidence {result.confidence:.2f}). "
        "Its best guess and the evidence follow.",
        style="bold yellow",
    )


def confidence_line(result: AgentResult) -> Text:
    if result.confidence is None:
        return Text("confidence: not measured", style="dim")
    label = "calibrated" if result.calibrated else "uncalibrated"
    source = SOURCE_WORDS.get(result.confidence_source, result.confidence_source)
    return Text.assemble(
        ("confidence: ", "bold"), f"{result.confidence:.2f} ", (f"({label}; {source})", "dim")
    )


def route_lines(result: AgentResult) -> list[RenderableType]:
    route = result.route
    if route is None:
        return []
    path = "answered without retrieval" if route.path == "plain" else "retrieved evidence"
    lines: list[RenderableType] = [Text(f"adaptive: {path}: {route.reason}", style="dim")]
    if route.changed:
        lines.append(Text(f"note: {route.changed}", style="yellow"))
    return lines
