"""`suwen report`: draft reports cite the kept similar cases they borrow from, flag the rest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen import runtime
from suwen.agent.prompts import (
    REPORT_COMPARE_PRIOR,
    REPORT_NO_PRIOR,
    REPORT_STUDIES,
    REPORT_TASK,
)
from suwen.agent.report import draft_report, parse_report, region_findings
from suwen.cli import app
from suwen.types import DraftReport, Question
from tests.agent_helpers import cases, make_agent
from tests.fake_model import FakeCall, FakeModel, evidence_items
from tests.fake_search import FakeImageSearch
from tests.test_ask import Opened
from tests.test_studies import CHANGES


def _rendered(drafted: DraftReport) -> str:
    from rich.console import Console

    from suwen.commands.report import report_view

    console = Console(width=160, record=True)
    console.print(report_view(drafted))
    return console.export_text()


UNCITED = "Findings are consistent with a large pneumothorax needing urgent care."


def relevance(call: FakeCall) -> str:
    """The reread keeps synpic1 (the pneumothorax case) and drops synpic2."""
    body = evidence_items(call.last)[0][1]
    return json.dumps({"relevance": 0.9 if "pneumothorax" in body else 0.1, "quote": body})


def written_report(call: FakeCall) -> str:
    refs = [label for label, _ in evidence_items(call.last)]
    cite = refs[0] if refs else ""
    return (
        "TECHNIQUE: Frontal chest radiograph.\n"
        "COMPARISON: None.\n"
        "FINDINGS:\n"
        f"- Lungs: Right pneumothorax with mediastinal shift is present {cite}.\n"
        "- Heart: The cardiac silhouette is within normal limits [7].\n"
        f"IMPRESSION: {UNCITED}"
    )


def scripted() -> FakeModel:
    return FakeModel().script("reread", relevance).script("report", written_report)


@pytest.fixture()
def jpeg(shared_data: Path) -> str:
    return str(sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0])


def run(tmp_path: Path, model: FakeModel, question: Question, plain: bool = False) -> DraftReport:
    agent = make_agent(tmp_path, model, images=FakeImageSearch(cases()))
    return asyncio.run(draft_report(agent, question, plain=plain))


def test_report_cites_the_kept_case_and_flags_what_it_cannot_source(
    tmp_path: Path, jpeg: str
) -> None:
    model = scripted()
    drafted = run(tmp_path, model, Question(text=REPORT_TASK, images=[jpeg]))
    prompt = model.calls_for("report")[0]
    references = evidence_items(prompt.last)
    # Only the case the reread kept above the threshold is a reference.
    assert len(references) == 1
    assert "Right tension pneumothorax with mediastinal shift." in references[0][1]
    assert REPORT_NO_PRIOR in prompt.last and prompt.images == 1
    assert [(c.number, c.case_id) for c in drafted.citations] == [(1, "synpic1")]
    assert drafted.removed_citations == ["7"]  # points at no reference: removed
    assert drafted.technique == "Frontal chest radiograph." and drafted.comparison == "None."
    assert [(row.region, row.text) for row in drafted.findings] == [
        ("Lungs", "Right pneumothorax with mediastinal shift is present [1]."),
        ("Heart", "The cardiac silhouette is within normal limits."),
    ]
    assert drafted.impression == UNCITED
    assert drafted.unsupported_sentences == [
        "Heart: The cardiac silhouette is within normal limits.",
        UNCITED,
    ]
    assert [event.node for event in drafted.trace] == [
        "look",
        "plan",
        "retrieve",
        "reread",
        "report",
    ]
    assert drafted.model_calls == len(model.calls) and not drafted.degraded


def test_plain_report_has_no_references(tmp_path: Path, jpeg: str) -> None:
    model = scripted()
    drafted = run(tmp_path, model, Question(text=REPORT_TASK, images=[jpeg]), plain=True)
    assert [call.purpose for call in model.calls] == ["report"]
    assert evidence_items(model.calls[0].text) == [] and drafted.citations == []
    assert drafted.mode == "plain" and drafted.removed_citations == ["7"]


def test_report_against_a_prior_asks_for_the_comparison(tmp_path: Path, jpeg: str) -> None:
    other = str(sorted(Path(jpeg).parent.glob("*.jpg"))[1])
    model = scripted()
    question = Question(
        text=REPORT_TASK,
        images=[jpeg],
        prior_images=[other],
        image_dates={other: "2020-01-01", jpeg: "2021-06-30"},
    )
    model.script("look", json.dumps(CHANGES))
    drafted = run(tmp_path, model, question)
    prompt = model.calls_for("report")[0].messages[-1]
    assert "Changes since the prior study: larger: right upper lobe nodule" in prompt.text
    assert "Comparison with the prior study" in _rendered(drafted)
    assert REPORT_COMPARE_PRIOR in prompt.text and REPORT_STUDIES in prompt.text
    assert prompt.image_labels == [
        f"Image 1: prior study (2020-01-01): {Path(other).name}",
        f"Image 2: current study (2021-06-30): {Path(jpeg).name}",
    ]
    assert drafted.prior_images == [other]


def test_parse_report_reads_markdown_headings_and_headless_text() -> None:
    sections = parse_report(
        "**Technique:** CT head.\n## FINDINGS\n1. Brain: normal.\nImpression: ok"
    )
    assert sections == {
        "technique": "CT head.",
        "findings": "1. Brain: normal.",
        "impression": "ok",
    }
    assert parse_report("Just a sentence.") == {"findings": "Just a sentence."}
    assert [r.region for r in region_findings("1. Brain: normal.\nno region here")] == ["Brain", ""]


@pytest.fixture()
def opened(suwen_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Opened]:
    monkeypatch.setenv("COLUMNS", "200")
    fakes = Opened()
    fakes.model.script("reread", relevance).script("report", written_report)
    previous = runtime.install_backends(fakes.backends())
    yield fakes
    runtime.install_backends(previous)


def test_report_command_renders_and_prints_json(opened: Opened, jpeg: str) -> None:
    shown = CliRunner().invoke(app, ["report", jpeg])
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert "FINDINGS:" in out and "Lungs: Right pneumothorax" in out
    assert "case synpic1" in out and "uncited: " + UNCITED in out
    assert "radiologist to review" in out
    as_json = CliRunner().invoke(app, ["report", jpeg, "--json"])
    drafted = DraftReport.model_validate_json(as_json.stdout)
    assert drafted.citations[0].case_id == "synpic1" and drafted.images == [str(Path(jpeg))]


def test_report_command_refuses_a_bad_image_in_one_line(opened: Opened, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = CliRunner().invoke(app, ["report", str(broken)])
    assert result.exit_code == 2 and str(broken) in result.output
    assert opened.model.calls == []


def test_batch_task_report_drafts_one_report_per_line(
    opened: Opened, jpeg: str, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "studies"
    folder.mkdir()
    shutil.copy(jpeg, folder / "a.jpg")
    rows = [{"id": "s1", "image": "a.jpg", "question": "Dyspnoea after a fall."}]
    (folder / "questions.jsonl").write_text(json.dumps(rows[0]) + "\n")
    out = tmp_path / "reports.jsonl"
    result = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out), "--task", "report"])
    assert result.exit_code == 0, result.output
    line = json.loads(out.read_text())
    assert line["id"] == "s1" and line["answer"].startswith("TECHNIQUE: Frontal chest")
    assert line["short_answer"] == UNCITED and line["citations"][0]["case_id"] == "synpic1"
    assert parse_report(line["answer"])["impression"] == UNCITED
    prompt = opened.model.calls_for("report")[0]
    assert "Clinical indication: Dyspnoea after a fall." in prompt.last
    bad = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out), "--task", "summary"])
    assert bad.exit_code == 2 and "--task summary" in bad.output


def test_references_that_would_overflow_the_model_length_are_left_out(
    tmp_path: Path, jpeg: str
) -> None:
    question = Question(text=REPORT_TASK, images=[jpeg])
    full = scripted()
    run(tmp_path / "full", full, question)
    with_reference = full.measured[0]  # the kept case as reference [1]
    max_tokens = make_agent(tmp_path, full).settings.max_tokens
    model = scripted()
    model.context_length = with_reference - 1 + max_tokens
    drafted = run(tmp_path / "tight", model, question)
    report = model.calls_for("report")[0]
    assert evidence_items(report.last) == [] and drafted.citations == []
    assert model.measured[-1] < with_reference
    trace = next(event.message for event in drafted.trace if event.node == "report")
    assert "1 evidence item(s) left out to fit the model length" in trace
