"""`suwen eval --case-examples 0,2`: the agent modes run once per count of similar cases shown
as worked examples, each into its own samples file (resumable), and the report compares the
counts per benchmark as it compares plain with agent. The agent is the real graph on the
scripted model, so the count really decides what the answer prompt shows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from suwen.commands.eval_cmd import parse_case_examples
from suwen.errors import InputError
from suwen.evaluate.benchmarks import Sample, load_benchmark
from suwen.evaluate.report import write_report
from suwen.evaluate.runner import (
    EvalConfig,
    ModeRun,
    mode_run_of,
    mode_runs,
    read_records,
    record_run,
    run_evaluation,
    samples_path,
)
from suwen.runtime import AgentAnswerer, ExampleVariants
from tests.agent_helpers import make_agent
from tests.fake_model import FakeCall, FakeModel
from tests.fake_search import FakeImageSearch, case_hit


@pytest.fixture(scope="module")
def yes_no(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    cache = tmp_path_factory.mktemp("cache")
    samples = load_benchmark("VQA-RAD", shared_data, cache, limit=40, seed=3)
    return [s for s in samples if s.kind == "yes_no"][:5]


def _cases(shared_data: Path) -> FakeImageSearch:
    images = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[-2:]
    hits = [
        case_hit(f"case-{i}", f"A strong match {i}.").model_copy(update={"path": str(path)})
        for i, path in enumerate(images)
    ]
    return FakeImageSearch([(hit, f"{i}" * 64) for i, hit in enumerate(hits)])


def _model(samples: list[Sample]) -> FakeModel:
    """Answers right when worked examples are shown (more than the question's own image),
    wrong otherwise; every similar case is judged relevant."""

    def answer(call: FakeCall) -> str:
        sample = next(s for s in samples if s.question in call.last)
        wrong = "no" if sample.gold == "yes" else "yes"
        shown = len(call.messages[-1].images)
        return f"Seen on the image.\nShort answer: {sample.gold if shown > 1 else wrong}"

    reread = json.dumps({"relevance": 0.95, "quote": "A strong match"})
    return FakeModel().script("reread", reread).script("answer", answer)


def _run(
    config: EvalConfig, samples: list[Sample], model: FakeModel, variants: ExampleVariants
) -> None:
    asyncio.run(
        run_evaluation(
            config, {"VQA-RAD": samples}, model=model, answerer=None, with_examples=variants
        )
    )


def test_each_count_is_its_own_run_and_the_report_compares_them(
    yes_no: list[Sample], shared_data: Path, tmp_path: Path
) -> None:
    model = _model(yes_no)
    agent = make_agent(tmp_path, model, images=_cases(shared_data), case_examples=2)
    variants = ExampleVariants(agent)
    out = tmp_path / "out"
    config = EvalConfig(
        benchmarks=["VQA-RAD"], modes=["plain", "agent"], out=out, case_examples=[0, 2]
    )
    _run(config, yes_no, model, variants)

    answers = model.calls_for("answer")
    assert sorted(len(call.messages[-1].images) for call in answers) == [1] * 5 + [3] * 5
    for count in (0, 2):
        records = read_records(samples_path(out, "VQA-RAD", f"agent@examples{count}"))
        assert {r.id for r in records} == {s.id for s in yes_no}
        assert {r.case_examples for r in records} == {count} and {r.mode for r in records} == {
            "agent"
        }
        assert all(r.correct is (count == 2) for r in records)
    assert not samples_path(out, "VQA-RAD", "agent").exists()

    metrics = write_report(out)
    entry = metrics["benchmarks"]["VQA-RAD"]
    assert set(entry["modes"]) == {"plain", "agent@examples0", "agent@examples2"}
    effect = entry["case_examples"]["agent"]["0->2"]
    assert effect["n"] == 5 and effect["fixed"] == 5 and effect["broken"] == 0
    assert (effect["plain_accuracy"], effect["agent_accuracy"], effect["delta"]) == (0, 1, 1)
    assert set(entry["vs_plain"]) == {"agent@examples0", "agent@examples2"}
    assert metrics["run"]["case_examples"] == [0, 2]
    report = (out / "report.md").read_text()
    assert "## Similar cases as worked examples" in report
    assert "| VQA-RAD | agent | 5 | 0 → 2 | 0.0 | 100.0 | +100.0 [+100.0, +100.0] |" in report
    assert "| VQA-RAD, 0 case examples |" in report and "| VQA-RAD, 2 case examples |" in report
    assert "case examples compared: 0, 2" in report

    # Resuming asks nothing again; another set of counts in the same folder is refused.
    before = len(model.calls)
    _run(config, yes_no, model, variants)
    assert len(model.calls) == before
    with pytest.raises(InputError, match="case_examples"):
        record_run(config.model_copy(update={"case_examples": [0, 4]}), {})


def test_counts_apply_to_agent_modes_only_and_parse_strictly() -> None:
    runs = mode_runs(["plain", "agent", "agent-blank"], [0, 2])
    assert [run.key for run in runs] == [
        "plain",
        "agent@examples0",
        "agent@examples2",
        "agent-blank@examples0",
        "agent-blank@examples2",
    ]
    assert mode_run_of("agent-blank@examples2") == ModeRun("agent-blank", 2)
    assert ModeRun("agent", 2).label == "agent (2 case examples)"
    assert [run.key for run in mode_runs(["plain", "agent"], [])] == ["plain", "agent"]
    assert parse_case_examples("0, 2") == [0, 2]
    for bad in ("0,0", "two", "-1", ""):
        with pytest.raises(InputError, match="--case-examples"):
            parse_case_examples(bad)
    with pytest.raises(InputError, match="no mode"):
        mode_run_of("agent@examplesX")


def test_agent_answerer_is_made_once_per_count(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeModel(), case_examples=1)
    variants = ExampleVariants(agent)
    first, again = variants("agent", 3), variants("adaptive", 3)
    assert isinstance(first, AgentAnswerer) and isinstance(again, AgentAnswerer)
    assert first.agent is again.agent and first.agent.settings.case_examples == 3
    assert again.mode == "adaptive" and agent.settings.case_examples == 1
    assert variants("plain", 3) is None
