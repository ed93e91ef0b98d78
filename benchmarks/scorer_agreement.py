"""Agreement of MedEvalKit's rules and Suwen's scorer with a careful human verdict.

Reads benchmarks/data/tricky_responses.jsonl (hand-labelled responses: bare letters, markers,
hedges, empty answers, "normal"/"nodule"/"unknown" in yes/no answers, closed answers inside a
phrase, ...), scores each with both scorers, prints a table and writes
benchmarks/results/scorer_agreement.json.

    .venv/bin/python benchmarks/scorer_agreement.py

A MedEvalKit crash (no verdict at all) counts as a disagreement.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from suwen.evaluate import scoring
from suwen.evaluate import scoring_medevalkit as mek

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "tricky_responses.jsonl"
RESULT = HERE / "results" / "scorer_agreement.json"


def verdicts(row: dict[str, Any]) -> tuple[bool | None, bool | None]:
    """(MedEvalKit, Suwen) verdicts for one labelled response; None = no verdict (crash)."""
    medevalkit = mek.score_sample(
        row["family"],
        sample_id=row["id"],
        kind=row["kind"],
        gold=row["gold"],
        choices=row["choices"],
        options=row["options"],
        response=row["response"],
    )
    suwen = scoring.score(row["kind"], row["response"], row["gold"], row["options"])
    return (None if medevalkit.crash else medevalkit.correct), suwen.correct


def measure(path: Path = DATA) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    per_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    disagreements: dict[str, list[str]] = {"medevalkit": [], "suwen": []}
    for row in rows:
        human = bool(row["human_correct"])
        for scorer, verdict in zip(("medevalkit", "suwen"), verdicts(row), strict=True):
            agrees = verdict is not None and verdict == human
            per_kind[row["kind"]][scorer] += agrees
            if not agrees:
                disagreements[scorer].append(f"{row['id']} ({row['note']})")
        per_kind[row["kind"]]["n"] += 1
    n = len(rows)
    total = {s: sum(k[s] for k in per_kind.values()) for s in ("medevalkit", "suwen")}
    return {
        "n": n,
        "agreement": {s: total[s] / n for s in total},
        "by_kind": {kind: dict(counts) for kind, counts in sorted(per_kind.items())},
        "disagreements": disagreements,
    }


def main() -> None:
    result = measure()
    print(f"{'kind':<10}{'n':>4}{'MedEvalKit':>12}{'Suwen':>8}")
    for kind, counts in result["by_kind"].items():
        print(f"{kind:<10}{counts['n']:>4}{counts['medevalkit']:>12}{counts['suwen']:>8}")
    agreement = result["agreement"]
    print(
        f"{'all':<10}{result['n']:>4}{100 * agreement['medevalkit']:>11.1f}%"
        f"{100 * agreement['suwen']:>7.1f}%"
    )
    for scorer, items in result["disagreements"].items():
        print(f"{scorer} disagrees with the human verdict on: {', '.join(items) or 'none'}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULT.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
