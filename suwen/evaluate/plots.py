"""The report's confidence plots, per benchmark, every mode on the same axes (matplotlib).

- reliability diagram: accuracy against mean confidence in each of the 15 bins (the diagonal
  is perfect calibration; marker area grows with the bin's count);
- risk-coverage: the error rate of the k most confident answers against k / n (lower is better;
  the area under it is the AURC).

Both are drawn from metrics.json's numbers alone, so they match the tables.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from suwen.evaluate.metric_types import Metrics, ModeMetrics
from suwen.files import atomic_path

MARKER_AREA = 400.0  # marker area of a bin holding every answer


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "benchmark"


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def reliability_diagram(name: str, modes: dict[str, ModeMetrics], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.0, 4.6))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    for mode, metrics in modes.items():
        bins = metrics.get("reliability") or []
        if not bins:
            continue
        total = sum(b["count"] for b in bins)
        sizes = [MARKER_AREA * b["count"] / total + 10 for b in bins]
        confidence = [b["confidence"] for b in bins]
        accuracy = [b["accuracy"] for b in bins]
        ece = metrics.get("ece")
        label = f"{mode} (ECE {ece:.3f})" if ece is not None else mode
        (line,) = axes.plot(confidence, accuracy, marker="", linewidth=1, label=label)
        axes.scatter(confidence, accuracy, s=sizes, color=line.get_color(), alpha=0.7)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (mean in bin)")
    axes.set_ylabel("accuracy in bin")
    axes.set_title(f"{name}: reliability")
    axes.legend(loc="upper left", fontsize="small")
    _save(figure, path)


def risk_coverage_plot(name: str, modes: dict[str, ModeMetrics], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.0, 4.6))
    for mode, metrics in modes.items():
        curve = metrics.get("risk_coverage") or {}
        if not curve.get("coverage"):
            continue
        aurc = metrics.get("aurc")
        label = f"{mode} (AURC {aurc:.3f})" if aurc is not None else mode
        axes.plot(curve["coverage"], curve["risk"], linewidth=1.5, label=label)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("coverage (share answered, most confident first)")
    axes.set_ylabel("risk (error rate of those answered)")
    axes.set_title(f"{name}: risk-coverage")
    axes.legend(loc="upper left", fontsize="small")
    _save(figure, path)


def confidence_plots(metrics: Metrics, out: Path) -> dict[str, list[str]]:
    """Write both plots for every benchmark with measured confidences; benchmark -> file names
    (relative to ``out``)."""
    written: dict[str, list[str]] = {}
    for name, entry in metrics["benchmarks"].items():
        modes = {m: v for m, v in entry["modes"].items() if v.get("reliability")}
        if not modes:
            continue
        import matplotlib

        matplotlib.use("Agg")
        slug = _slug(name)
        files = [f"reliability-{slug}.png", f"risk-coverage-{slug}.png"]
        reliability_diagram(name, modes, out / files[0])
        risk_coverage_plot(name, modes, out / files[1])
        written[name] = files
    return written
