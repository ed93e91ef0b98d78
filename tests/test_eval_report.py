"""Report: every number equals the one recomputed from the samples files; the CLI end to end
with a scripted model; the paired statistics."""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import TypeAdapter
from typer.testing import CliRunner

from suwen.evaluate import scoring_medevalkit as mek
from suwen.evaluate.benchmarks import Sample, load_benchmark
from suwen.evaluate.metric_types import MedEvalKitScore, Metrics, Paired
from suwen.evaluate.report import PUBLISHED_LINGSHU_7B, pct, signed_pct, write_report
from suwen.evaluate.runner import EvalConfig, read_records, run_evaluation, samples_path
from suwen.evaluate.stats import PairedComparison, bootstrap_delta_ci, compare, mcnemar_exact
from suwen.types import Question
from tests.test_eval_runner import FakeAnswerer, FakeModel, gold_of


@pytest.fixture(scope="module")
def finished_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cache = out / "cache"
    samples = {
        "VQA-RAD": load_benchmark("VQA-RAD", shared_data, cache, limit=20, seed=0),
        "PubMedQA": load_benchmark("PubMedQA", shared_data, cache, limit=20, seed=0),
    }
    everything: list[Sample] = [s for items in samples.values() for s in items]
    by_text = {s.to_question().text: s for s in everything}

    def agent_short(question: Question) -> str:
        sample = by_text[question.text]
        # The agent is right on the first 15 of each benchmark, plainly wrong afterwards.
        index = [s.id for s in samples[sample.benchmark]].index(sample.id)
        if index >= 15:
            return "unsure"
        return sample.gold if sample.kind != "choice" else sample.options[sample.gold]

    config = EvalConfig(benchmarks=list(samples), out=out, seed=0, model="fake")
    asyncio.run(
        run_evaluation(
            config,
            samples,
            model=FakeModel(gold_of(everything)),
            answerer=FakeAnswerer(agent_short),
        )
    )
    write_report(out)
    return out


def _recomputed(out: Path, benchmark: str) -> dict[str, Any]:
    plain = {r.id: r for r in read_records(samples_path(out, benchmark, "plain"))}
    agent = {r.id: r for r in read_records(samples_path(out, benchmark, "agent"))}
    ids = sorted(plain)
    p = [bool(plain[i].correct) for i in ids]
    a = [bool(agent[i].correct) for i in ids]
    return {
        "plain": sum(p) / len(p),
        "agent": sum(a) / len(a),
        "fixed": sum(x and not y for x, y in zip(a, p, strict=True)),
        "broken": sum(y and not x for x, y in zip(a, p, strict=True)),
        "plain_mek": sum(bool(plain[i].medevalkit.correct) for i in ids) / len(ids),
        "open_plain": [plain[i] for i in ids if plain[i].kind == "open"],
        "p": p,
        "a": a,
    }


def test_every_output_exists_and_parses(finished_run: Path) -> None:
    for name in ("VQA-RAD", "PubMedQA"):
        for mode in ("plain", "agent"):
            assert len(read_records(samples_path(finished_run, name, mode))) == 20
    json.loads((finished_run / "metrics.json").read_text())
    assert "<table>" in (finished_run / "report.html").read_text()
    with Image.open(finished_run / "chart.png") as chart:
        assert chart.format == "PNG" and chart.width > 300
    assert not list(finished_run.glob("*.part"))


def test_report_numbers_equal_those_recomputed_from_the_samples(finished_run: Path) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    report = (finished_run / "report.md").read_text()
    for name in ("VQA-RAD", "PubMedQA"):
        entry, again = metrics["benchmarks"][name], _recomputed(finished_run, name)
        assert entry["modes"]["plain"]["suwen"]["accuracy"] == pytest.approx(again["plain"])
        assert entry["modes"]["agent"]["suwen"]["accuracy"] == pytest.approx(again["agent"])
        paired = entry["paired"]
        assert paired["delta"] == pytest.approx(again["agent"] - again["plain"])
        assert (paired["fixed"], paired["broken"]) == (again["fixed"], again["broken"])
        assert paired["mcnemar_p"] == pytest.approx(mcnemar_exact(again["fixed"], again["broken"]))
        assert paired["ci95"][0] <= paired["delta"] <= paired["ci95"][1]
        right = {mode: round(again[mode] * 20) for mode in ("plain", "agent")}
        row = (
            f"| {name} | 20/20 of 20 | {pct(again['plain'])} ({right['plain']}/20) | "
            f"{pct(again['agent'])} ({right['agent']}/20) | "
            f"{signed_pct(again['agent'] - again['plain'])} |"
        )
        assert row in report
        assert f"{PUBLISHED_LINGSHU_7B[name]:.1f}*" in report
        agent_records = read_records(samples_path(finished_run, name, "agent"))
        unparsed = entry["modes"]["agent"]["suwen"]["unparsed"]
        assert unparsed == sum(r.unparsed for r in agent_records)
        if name == "PubMedQA":
            assert unparsed == 5  # "unsure" names no option: wrong, and counted
            assert "PubMedQA agent: 5 unparsed answers" in report
    vqa = metrics["benchmarks"]["VQA-RAD"]
    again = _recomputed(finished_run, "VQA-RAD")
    kinds = vqa["by_type"]["kind"]
    opened = again["open_plain"]
    assert kinds["open"]["plain"]["accuracy"] == pytest.approx(
        sum(bool(r.correct) for r in opened) / len(opened)
    )
    assert vqa["modes"]["plain"]["medevalkit"]["accuracy"] == pytest.approx(again["plain_mek"])
    assert vqa["modes"]["plain"]["medevalkit"]["open_accuracy"] == pytest.approx(
        sum(bool(r.medevalkit.correct) for r in opened) / len(opened) ** 2
    )
    assert "CHEST" in vqa["by_type"]["body_part"]
    assert metrics["run"]["leakage_guard"] is True
    assert "Leakage guard on" in report and "published" in report.lower()


def test_report_rebuilds_identically(finished_run: Path) -> None:
    before = (finished_run / "metrics.json").read_text()
    write_report(finished_run)
    assert (finished_run / "metrics.json").read_text() == before


def test_metrics_json_has_exactly_the_declared_shape(finished_run: Path) -> None:
    """Every key metrics.json holds is declared in suwen/evaluate/metric_types.py, with its
    type: validating against the TypedDicts and writing back gives the file's content."""
    raw = json.loads((finished_run / "metrics.json").read_text())
    shape = TypeAdapter(Metrics)
    assert shape.dump_python(shape.validate_python(raw, strict=False), mode="json") == raw
    assert all(m["signals"] for e in raw["benchmarks"].values() for m in e["modes"].values())


def test_metric_types_mirror_the_models_they_dump() -> None:
    assert list(MedEvalKitScore.__annotations__) == list(mek.MekMetrics.model_fields)
    assert list(Paired.__annotations__) == list(PairedComparison.model_fields)


def test_paired_statistics() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    plain = [True] * 50 + [False] * 50
    agent = [True] * 50 + [True] * 20 + [False] * 30
    result = compare(plain, agent)
    assert result.delta == pytest.approx(0.2) and (result.fixed, result.broken) == (20, 0)
    low, high = result.ci95
    assert 0.1 < low < 0.2 < high < 0.3
    assert bootstrap_delta_ci([True, False], [True, False]) == (0.0, 0.0)
    assert math.isclose(result.mcnemar_p, 2 / 2**20)


def test_cli_runs_resumes_and_reports(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from suwen import runtime
    from suwen.cli import app
    from suwen.errors import IndexMissingError

    cache = tmp_path / "home" / "eval_cache"
    samples = load_benchmark("PubMedQA", shared_data, cache, limit=4, seed=5)
    model = FakeModel(gold_of(samples))

    @contextmanager
    def open_model(settings: Any, urls: Any) -> Any:
        yield model

    def no_index(settings: Any, name: str) -> Any:
        raise IndexMissingError(f"index {name!r} not built")

    previous = runtime.install_backends(
        runtime.Backends(open_model=open_model, open_text=no_index, open_images=no_index)
    )
    try:
        monkeypatch.setenv("SUWEN_HOME", str(tmp_path / "home"))
        out = tmp_path / "out"
        args = [
            "eval",
            "--benchmark",
            "pubmedqa",
            "--data",
            str(shared_data),
            "--modes",
            "plain",
            "--out",
            str(out),
            "--limit",
            "4",
            "--seed",
            "5",
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "PubMedQA plain: 4/4 done (4 now)" in result.output
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0 and "(0 now)" in again.output
        assert len(model.prompts) == 4
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["benchmarks"]["PubMedQA"]["modes"]["plain"]["suwen"]["accuracy"] == (
            pytest.approx(sum(int(s.id[-1]) % 2 == 0 for s in samples) / 4)
        )
        bad = CliRunner().invoke(app, ["eval", "--benchmark", "nope", "--out", str(out)])
        assert bad.exit_code != 0 and "unknown benchmark" in bad.output
        for flag, value in (("--lang", "fr"), ("--modes", "plain,noise")):
            wrong = CliRunner().invoke(
                app, ["eval", "--benchmark", "pubmedqa", "--out", str(out), flag, value]
            )
            assert wrong.exit_code != 0 and flag in wrong.output
        run = json.loads((out / "run.json").read_text())
        assert run["config"]["sampling"]["top_p"] == 0.0001
        assert run["config"]["images"]["max_pixels"] == 12_845_056
    finally:
        runtime.install_backends(previous)
