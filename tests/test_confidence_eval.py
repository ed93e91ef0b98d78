"""Confidence in the evaluation: records, metrics.json's stable keys recomputed from the samples,
flips against plain, abstentions as their own outcome, the plots, and --calibrate end to end."""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from suwen.evaluate.benchmarks import Sample, load_benchmark
from suwen.evaluate.calibration import aurc, brier, ece, is_dev, load_calibration
from suwen.evaluate.confidence_eval import fit_from_run, plain_confidence_judge
from suwen.evaluate.report import write_report
from suwen.evaluate.runner import (
    EvalConfig,
    load_selected,
    read_records,
    run_evaluation,
    samples_path,
)
from suwen.types import AgentResult, Citation, Evidence, Question, Route, TextHit
from tests.fake_model import FakeCall, FakeModel, Probs

ABSTAIN = 0.35


@pytest.fixture(scope="module")
def pubmedqa(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    return load_benchmark(
        "PubMedQA", shared_data, tmp_path_factory.mktemp("cache"), limit=40, seed=0
    )


def _index(samples: list[Sample], sample: Sample) -> int:
    return [s.id for s in samples].index(sample.id)


def _wrong(sample: Sample) -> str:
    return "B" if sample.gold == "A" else "A"


def plain_model(samples: list[Sample]) -> FakeModel:
    """Right on even questions (confidence 0.9), wrong on odd ones (confidence 0.6)."""
    by_prompt = {s.prompt: s for s in samples}

    def reply(call: FakeCall) -> str:
        sample = by_prompt[call.last]
        return sample.gold if _index(samples, sample) % 2 == 0 else _wrong(sample)

    def probe(call: FakeCall) -> Probs:
        sample = by_prompt[call.last]
        if _index(samples, sample) % 2 == 0:
            return Probs({sample.gold: 0.9, _wrong(sample): 0.1})
        return Probs({_wrong(sample): 0.6, sample.gold: 0.4})

    return FakeModel().script("eval-plain", reply).script("confidence", probe)


class ScriptedAgent:
    """Agent mode: right on the first 30 (confidence 0.8), then wrong (0.3, abstained).
    Adaptive: plain's answer where plain was confident, else the agent's."""

    def __init__(self, samples: list[Sample], adaptive: bool) -> None:
        self.samples = samples
        self.by_text = {s.to_question().text: s for s in samples}
        self.adaptive = adaptive
        self.families: list[str | None] = []

    async def __call__(self, question: Question) -> AgentResult:
        self.families.append(question.family)
        sample = self.by_text[question.text]
        index = _index(self.samples, sample)
        if self.adaptive and index % 2 == 0:
            route = Route(path="plain", reason="confident", threshold=0.8, plain_answer=sample.gold)
            return AgentResult(
                question=question.text,
                mode="adaptive",
                answer=sample.gold,
                short_answer=sample.gold,
                confidence=0.9,
                confidence_raw=0.9,
                model_calls=2,
                route=route,
            )
        right = index < 30
        confidence = 0.8 if right else 0.3
        route = None
        if self.adaptive:
            changed = f"retrieval changed the answer from {_wrong(sample)} to {sample.gold}"
            route = Route(
                path="agent",
                reason="unsure",
                threshold=0.8,
                plain_answer=_wrong(sample),
                changed=changed if right else None,
            )
        hit = TextHit(key="pmid:1#0", score=1.0, index="pubmed", pmid="1", chunk_id="1#0")
        return AgentResult(
            question=question.text,
            mode="adaptive" if self.adaptive else "agent",
            citations=[Citation(number=1, key=hit.key, pmid="1")],
            evidence=[Evidence(key=hit.key, hit=hit, relevance=0.9 if right else 0.2)],
            supported=True,
            answer="because [1]",
            short_answer=sample.gold if right else _wrong(sample),
            confidence=confidence,
            confidence_raw=confidence,
            abstained=confidence < ABSTAIN,
            model_calls=14,
            route=route,
        )


@pytest.fixture(scope="module")
def finished(pubmedqa: list[Sample], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    config = EvalConfig(
        benchmarks=["PubMedQA"],
        out=out,
        model="fake",
        modes=["plain", "agent", "adaptive"],
        abstain_below=ABSTAIN,
    )
    model = plain_model(pubmedqa)
    asyncio.run(
        run_evaluation(
            config,
            {"PubMedQA": pubmedqa},
            model=model,
            answerer=ScriptedAgent(pubmedqa, adaptive=False),
            adaptive=ScriptedAgent(pubmedqa, adaptive=True),
            plain_confidence=plain_confidence_judge(model, None, ABSTAIN),
        )
    )
    write_report(out)
    return out


def _records(out: Path, mode: str) -> dict[str, Any]:
    return {r.id: r for r in read_records(samples_path(out, "PubMedQA", mode))}  # type: ignore[arg-type]


def test_plain_records_carry_the_probed_confidence(finished: Path, pubmedqa: list[Sample]) -> None:
    plain = _records(finished, "plain")
    for sample in pubmedqa:
        record = plain[sample.id]
        even = _index(pubmedqa, sample) % 2 == 0
        assert record.correct is even
        assert record.confidence == pytest.approx(0.9 if even else 0.6)
        assert record.confidence_source == "option-probability" and not record.calibrated
        assert record.model_calls == 2 and not record.abstained  # reply + probe


def test_metrics_json_stable_keys_equal_the_recomputed_numbers(
    finished: Path, pubmedqa: list[Sample]
) -> None:
    metrics = json.loads((finished / "metrics.json").read_text())
    entry = metrics["benchmarks"]["PubMedQA"]
    for mode in ("plain", "agent", "adaptive"):
        m = entry["modes"][mode]
        assert {"ece", "brier", "aurc", "acc_at_coverage", "calls_per_question"} <= set(m)
        assert set(m["acc_at_coverage"]) == {"0.80", "0.90", "0.95"}
        records = list(_records(finished, mode).values())
        confidence = [r.confidence for r in records]
        correct = [bool(r.correct) for r in records]
        assert m["ece"] == pytest.approx(ece(confidence, correct))
        assert m["brier"] == pytest.approx(brier(confidence, correct))
        assert m["aurc"] == pytest.approx(aurc(confidence, correct))
        assert m["calls_per_question"] == pytest.approx(
            sum(r.model_calls for r in records) / len(records)
        )
    plain = entry["modes"]["plain"]
    assert plain["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)  # 0.9 vs 1.0, 0.6 vs 0.0
    assert plain["acc_at_coverage"]["0.80"] == pytest.approx(20 / 32)
    assert plain["retrieved_share"] is None
    assert entry["modes"]["adaptive"]["retrieved_share"] == pytest.approx(0.5)


def test_signals_are_scored_by_how_well_they_tell_right_from_wrong(finished: Path) -> None:
    modes = entry_modes(finished)
    assert modes["plain"]["signals"]["confidence"] == pytest.approx(1.0)
    assert "agrees_with_plain" not in modes["plain"]["signals"]
    agent = modes["agent"]["signals"]
    assert agent["cited_relevance"] == pytest.approx(1.0)
    assert agent["all_claims_cited"] == pytest.approx(0.5)  # always true: says nothing
    assert 0.0 <= agent["agrees_with_plain"] <= 1.0
    records = _records(finished, "agent")
    assert all(r.cited_relevance in (0.9, 0.2) and r.all_claims_cited for r in records.values())
    assert "agrees with plain" in (finished / "report.html").read_text()


def test_abstentions_are_neither_right_nor_wrong(finished: Path) -> None:
    agent = entry_modes(finished)["agent"]
    assert agent["suwen"]["abstained"] == agent["abstained"] == 10
    assert agent["suwen"]["total"] == 30 and agent["suwen"]["accuracy"] == 1.0
    rows = _records(finished, "agent")
    assert sum(r.abstained for r in rows.values()) == 10


def entry_modes(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())["benchmarks"]["PubMedQA"]["modes"]


def test_flips_against_plain_count_both_ways_with_examples(finished: Path) -> None:
    flips = json.loads((finished / "metrics.json").read_text())["benchmarks"]["PubMedQA"]["flips"]
    plain, adaptive = _records(finished, "plain"), _records(finished, "adaptive")
    answered = [i for i in plain if not adaptive[i].abstained]
    wrong_to_right = [i for i in answered if not plain[i].correct and adaptive[i].correct]
    right_to_wrong = [i for i in answered if plain[i].correct and not adaptive[i].correct]
    assert flips["adaptive"]["wrong_to_right"] == len(wrong_to_right) == 15
    assert flips["adaptive"]["right_to_wrong"] == len(right_to_wrong) == 0
    example = flips["adaptive"]["examples"]["wrong_to_right"][0]
    assert example["id"] in wrong_to_right and "retrieval changed the answer" in example["changed"]
    assert flips["agent"]["right_to_wrong"] == 0 and flips["agent"]["paired"] == 30


def test_report_has_the_table_and_both_plots(finished: Path) -> None:
    html = (finished / "report.html").read_text()
    markdown = (finished / "report.md").read_text()
    for name in ("reliability-PubMedQA.png", "risk-coverage-PubMedQA.png"):
        assert (finished / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in html and name in markdown
    assert "Confidence, calibration and cost" in html and "right→wrong" in markdown


def test_agent_answers_use_their_benchmarks_calibration_family(pubmedqa: list[Sample]) -> None:
    agent = ScriptedAgent(pubmedqa[:2], adaptive=False)
    from suwen.evaluate.runner import agent_responder

    asyncio.run(agent_responder(agent)(pubmedqa[0]))
    assert agent.families == ["PubMedQA"]


def test_fit_from_run_learns_maps_and_a_threshold(finished: Path) -> None:
    fitted = fit_from_run(finished, "fake", None)
    assert {"PubMedQA/plain", "PubMedQA/agent", "choice/plain"} <= set(fitted.maps)
    assert fitted.maps["PubMedQA/plain"].fitted_on == 40
    # Plain is right exactly when confident: route the unsure ones only.
    calibrated_plain = fitted.maps["PubMedQA/plain"]
    assert calibrated_plain.apply(0.9) > calibrated_plain.apply(0.6)
    threshold = fitted.thresholds["PubMedQA"]
    assert calibrated_plain.apply(0.6) < threshold <= calibrated_plain.apply(0.9)


def test_calibrate_asks_only_the_dev_split(shared_data: Path, tmp_path: Path) -> None:
    config = EvalConfig(benchmarks=["PubMedQA"], data=shared_data, out=tmp_path, calibrate=True)
    selected = load_selected(config, tmp_path / "cache")["PubMedQA"]
    assert selected and all(is_dev("PubMedQA", s.id) for s in selected)
    test_config = config.model_copy(update={"calibrate": False})
    everything = load_selected(test_config, tmp_path / "cache")["PubMedQA"]
    assert len(selected) < len(everything) / 2


def test_cli_calibrate_then_answers_are_calibrated(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from suwen import runtime
    from suwen.cli import app
    from suwen.errors import IndexMissingError

    samples = load_benchmark("PubMedQA", shared_data, tmp_path / "c", limit=None, seed=0)
    model = plain_model(samples)

    @contextmanager
    def open_model(settings: Any, urls: Any) -> Any:
        yield model

    def no_index(settings: Any, name: str) -> Any:
        raise IndexMissingError(f"index {name!r} not built")

    home = tmp_path / "home"
    monkeypatch.setenv("SUWEN_HOME", str(home))
    previous = runtime.install_backends(runtime.Backends(open_model, no_index, no_index))
    try:
        base = ["eval", "-b", "pubmedqa", "--data", str(shared_data), "--modes", "plain"]
        dev = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "dev"), "--calibrate"])
        assert dev.exit_code == 0, dev.output
        assert "calibration PubMedQA/plain:" in dev.output
        calibration = load_calibration(home)
        assert (
            calibration is not None and (home / "calibration.json").stat().st_mode & 0o777 == 0o600
        )
        assert calibration.maps["PubMedQA/plain"].fitted_on == sum(
            is_dev("PubMedQA", s.id) for s in samples
        )

        test = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "test"), "--limit", "30"])
        assert test.exit_code == 0, test.output
        records = read_records(samples_path(tmp_path / "test", "PubMedQA", "plain"))
        assert records and all(r.calibrated for r in records)
        metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
        plain = metrics["benchmarks"]["PubMedQA"]["modes"]["plain"]
        # Calibrated records of the dev split are left out of the calibration metrics.
        assert plain["n"] == sum(not is_dev("PubMedQA", r.id) for r in records)
    finally:
        runtime.install_backends(previous)
