"""How an answer looks in the terminal: markdown, numbered evidence, similar cases, warnings.

Everything here comes from the model, the documents or the user, so every string is printed
literally (``literal``, ``safe_markdown`` from ``suwen.commands.common``): a ``[/]`` in a title
or ``[retracted in: Lancet 2019]`` in a caption is shown as written, never read as markup.

Shared by ``suwen ask`` and ``suwen chat``. Numbering follows the answer's citations ``[n]`` first,
then every other kept evidence item, so the numbers a user reads in the answer are the numbers
``/evidence N`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from suwen.agent.state import Turn
from suwen.chat_session import ChatTurn
from suwen.commands.common import (
    NOT_MEDICAL_ADVICE,
    labelled,
    literal,
    literal_line,
    safe_markdown,
)
from suwen.commands.comparison_view import comparison_lines, comparison_table
from suwen.commands.confidence_view import abstention_notice, confidence_line, route_lines
from suwen.sanitize import for_terminal
from suwen.types import AgentResult, Citation, Evidence, Hit, ImageHit, TextHit

QUOTE_PREVIEW = 160


@dataclass(frozen=True)
class EvidenceEntry:
    """One numbered line of the evidence panel."""

    number: int
    key: str
    cited: bool
    hit: Hit | None
    quote: str
    relevance: float | None
    citation: Citation | None = None

    @property
    def passage(self) -> TextHit | None:
        return self.hit if isinstance(self.hit, TextHit) else None

    @property
    def case(self) -> ImageHit | None:
        return self.hit if isinstance(self.hit, ImageHit) else None

    @property
    def is_case(self) -> bool:
        return self.case is not None or self.key.startswith("case:")

    @property
    def source_label(self) -> str:
        passage, case, citation = self.passage, self.case, self.citation
        if self.is_case:
            case_id = (case and case.case_id) or (citation and citation.case_id) or self.key
            return f"case {case_id}"
        pmid = (passage and passage.pmid) or (citation and citation.pmid)
        page = (passage and passage.page) or (citation and citation.page)
        label = f"PMID {pmid}" if pmid else self.key
        return f"{label} p.{page}" if page else label

    @property
    def title(self) -> str:
        passage, citation = self.passage, self.citation
        if self.is_case:
            return (self.case and self.case.caption) or ""
        return (passage and passage.title) or (citation and citation.title) or ""

    @property
    def year(self) -> int | None:
        return self.passage.year if self.passage else None


def numbered_evidence(result: AgentResult) -> list[EvidenceEntry]:
    """Cited items under their citation numbers, then the other kept evidence, numbered on."""
    by_key = {item.key: item for item in result.evidence}
    entries = [
        _entry(citation.number, citation.key, by_key.get(citation.key), citation)
        for citation in sorted(result.citations, key=lambda c: c.number)
    ]
    cited = {citation.key for citation in result.citations}
    number = max((entry.number for entry in entries), default=0)
    for item in result.evidence:
        if item.kept and item.key not in cited:
            number += 1
            entries.append(_entry(number, item.key, item, None))
    return entries


def _entry(
    number: int, key: str, item: Evidence | None, citation: Citation | None
) -> EvidenceEntry:
    quote = (citation.quote if citation else "") or (item.quote if item else "")
    return EvidenceEntry(
        number=number,
        key=key,
        cited=citation is not None,
        hit=item.hit if item else None,
        quote=quote,
        relevance=item.relevance if item else None,
        citation=citation,
    )


def answer_view(result: AgentResult) -> RenderableType:
    """The answer as markdown, with the short answer, its confidence and any warnings beneath
    (led by the abstention notice when Suwen is not confident enough)."""
    notice = abstention_notice(result)
    parts: list[RenderableType] = [notice] if notice is not None else []
    parts.append(safe_markdown(result.answer or "_(no answer)_"))
    if result.short_answer and result.short_answer.strip() != result.answer.strip():
        parts.append(labelled("Short answer: ", result.short_answer, "bold"))
    parts.append(confidence_line(result))
    parts.extend(route_lines(result))
    parts.extend(warnings_view(result))
    return Group(*parts)


def warnings_view(result: AgentResult) -> list[RenderableType]:
    lines: list[RenderableType] = []
    for event in result.trace:
        if event.degraded:
            lines.append(literal_line(f"! {event.node}: {event.message}", style="yellow"))
    if result.removed_citations:
        removed = ", ".join(result.removed_citations)
        lines.append(
            literal_line(f"! citations not in the evidence were removed: {removed}", "yellow")
        )
    if result.mode == "agent" and result.unsupported_sentences:
        count = len(result.unsupported_sentences)
        lines.append(Text(f"! {count} sentence(s) without a citation", style="yellow"))
    return lines


def evidence_table(entries: list[EvidenceEntry], *, title: str = "Evidence") -> Table:
    """The numbered evidence panel: PMID, title and year; similar cases with their captions."""
    table = Table(title=title, title_justify="left", show_lines=False, expand=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("source", no_wrap=True)
    table.add_column("title / caption", ratio=2, overflow="fold")
    table.add_column("year", no_wrap=True)
    table.add_column("quote", ratio=3, overflow="fold")
    for entry in entries:
        number = f"[{entry.number}]" if entry.cited else str(entry.number)
        table.add_row(
            number,
            literal_line(entry.source_label),
            literal_line(entry.title),
            str(entry.year or ""),
            literal_line(_preview(entry.quote)),
        )
    return table


def similar_cases_table(entries: list[EvidenceEntry]) -> Table | None:
    cases = [(entry.number, entry.case) for entry in entries if entry.case is not None]
    if not cases:
        return None
    table = Table(title="Similar cases", title_justify="left", expand=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("case", no_wrap=True)
    table.add_column("caption", ratio=3, overflow="fold")
    table.add_column("modality", no_wrap=True)
    for number, case in cases:
        table.add_row(
            str(number),
            literal_line(case.case_id),
            literal_line(case.caption),
            literal_line(case.modality or ""),
        )
    return table


def _hit_details(hit: Hit) -> list[tuple[str, object]]:
    if isinstance(hit, TextHit):
        own: list[tuple[str, object]] = [("year", hit.year), ("journal", hit.journal)]
    else:
        own = [("modality", hit.modality), ("body part", hit.body_part), ("image", hit.path)]
    return [*own, ("index", hit.index), ("file", hit.source)]


def evidence_detail(entry: EvidenceEntry) -> Panel:
    """One evidence item in full, for ``/evidence N``."""
    hit = entry.hit
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="bold", no_wrap=True)
    rows.add_column(overflow="fold")
    rows.add_row("key", literal_line(entry.key))
    rows.add_row("source", literal_line(entry.source_label))
    if entry.title:
        rows.add_row("caption" if entry.is_case else "title", literal_line(entry.title))
    if hit is not None:
        for label, value in _hit_details(hit):
            if value:
                rows.add_row(label, literal_line(value))
    if entry.relevance is not None:
        rows.add_row("relevance", f"{entry.relevance:.2f}")
    if entry.quote:
        rows.add_row("quote", literal_line(entry.quote))
    body: list[RenderableType] = [rows]
    if hit is not None and hit.text:
        body.append(Text(""))
        body.append(literal(hit.text))
    title = literal_line(f"[{entry.number}] {entry.source_label}")
    return Panel(Group(*body), title=title, expand=True)


def notice() -> Text:
    return Text(NOT_MEDICAL_ADVICE, style="dim italic")


def result_view(result: AgentResult) -> RenderableType:
    """Everything ``suwen ask`` shows for one result."""
    entries = numbered_evidence(result)
    parts: list[RenderableType] = [answer_view(result)]
    comparison = comparison_table(result.findings)
    if comparison is not None:
        parts.append(comparison)
    cited = [entry for entry in entries if entry.cited]
    if cited:
        parts.append(evidence_table(cited, title="Citations"))
    cases = similar_cases_table([entry for entry in entries if not entry.cited])
    if cases is not None:
        parts.append(cases)
    if result.mode == "plain":
        parts.append(Text("plain mode: answered by the model alone, without retrieval", "dim"))
    parts.append(notice())
    return Group(*parts)


def plain_result(result: AgentResult) -> str:
    """The answer and its numbered sources as plain text: what is printed when the rendered
    view cannot be, so an answer is never lost to a rendering problem."""
    lines = [result.answer or "(no answer)", ""]
    if result.short_answer:
        lines += [f"Short answer: {result.short_answer}", ""]
    lines += comparison_lines(result.findings)
    entries = numbered_evidence(result)
    if entries:
        lines += ["Sources:", *(_source_markdown(entry) for entry in entries), ""]
    return "\n".join([*lines, NOT_MEDICAL_ADVICE])


def _preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_PREVIEW else text[: QUOTE_PREVIEW - 1] + "…"


def transcript_markdown(thread_id: str, earlier: Sequence[Turn], turns: Sequence[ChatTurn]) -> str:
    """A conversation as a markdown document: every question and answer, each answer followed
    by its numbered sources, so the [n] in the text can be checked. Without escape sequences
    or control characters: the file is shown in terminals too (``cat``, ``less -R``)."""
    lines = [f"# Suwen conversation {thread_id}", "", f"> {NOT_MEDICAL_ADVICE}", ""]
    if earlier:
        lines += ["## Earlier in this conversation", ""]
        for old in earlier:
            lines += [f"**You:** {old.question}", "", old.answer, ""]
    for number, turn in enumerate(turns, start=1):
        lines += _turn_markdown(number, turn)
    return for_terminal("\n".join(lines)).rstrip() + "\n"


def _turn_markdown(number: int, turn: ChatTurn) -> list[str]:
    result = turn.result
    lines = [f"## {number}. {turn.question}", ""]
    if turn.images:
        lines += ["Images: " + ", ".join(f"`{image}`" for image in turn.images), ""]
    mode = " (plain mode: no retrieval)" if result.mode == "plain" else ""
    lines += [f"**Suwen{mode}:**", "", result.answer or "_(no answer)_", ""]
    if result.short_answer:
        lines += [f"Short answer: {result.short_answer}", ""]
    lines += [confidence_line(result).plain, ""]
    entries = numbered_evidence(result)
    if entries:
        lines += ["Sources:", ""]
        lines += [_source_markdown(entry) for entry in entries]
        lines.append("")
    return lines


def _source_markdown(entry: EvidenceEntry) -> str:
    cited = "" if entry.cited else " (not cited)"
    title = f" -- {entry.title.rstrip('.')}" if entry.title else ""
    year = f" ({entry.year})" if entry.year else ""
    quote = f' "{" ".join(entry.quote.split())}"' if entry.quote else ""
    return f"{entry.number}. {entry.source_label}{title}{year}{cited}.{quote}"
