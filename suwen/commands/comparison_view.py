"""How a follow-up's comparison looks: what changed between the prior and the current study.

The changes are the model's words about the images, so every cell is printed literally.
"""

from __future__ import annotations

from rich.table import Table

from suwen.commands.common import literal_line
from suwen.types import Findings


def comparison_table(findings: Findings | None) -> Table | None:
    """The look step's change list as a table (None when no prior study was compared)."""
    if findings is None or not findings.changes:
        return None
    table = Table(title="Comparison with the prior study", title_justify="left", expand=True)
    table.add_column("change", style="bold", no_wrap=True)
    table.add_column("finding", ratio=1)
    for change in findings.changes:
        table.add_row(change.kind, literal_line(change.finding))
    return table


def comparison_lines(findings: Findings | None) -> list[str]:
    """The same as plain text lines ('' lines included), for the plain-text fallback."""
    if findings is None or not findings.changes:
        return []
    rows = [f"- {change.kind}: {change.finding}" for change in findings.changes]
    return ["Comparison with the prior study:", *rows, ""]
