"""MIMIC-CXR and CheXpert Plus report generation from local copies, in MedEvalKit's preprocessed
layout (test.json + images/) and in the datasets' own public layouts (MIMIC-CXR-JPG: split CSV,
files/pNN/pSUBJECT/sSTUDY/*.jpg and the reports' sSTUDY.txt; CheXpert Plus: its report CSV and
PNGs); and report benchmarks answered in agent mode on `suwen report`'s path. Neither dataset
is on these machines: the fixtures are built here from shared VQA-RAD chest radiographs with
report texts written for the tests."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from suwen.config import Settings
from suwen.errors import InputError, ModelError
from suwen.evaluate import prompts
from suwen.evaluate.benchmarks import load_benchmark, report_sections
from suwen.evaluate.metric_types import Metrics
from suwen.evaluate.report import write_report
from suwen.evaluate.runner import (
    EvalConfig,
    read_records,
    run_evaluation,
    samples_path,
    scored_report,
)
from suwen.runtime import AgentAnswerer
from tests.agent_helpers import make_agent
from tests.fake_model import Fail, FakeModel
from tests.fake_search import FakeImageSearch, case_hit
from tests.test_llm_client import FakeVLLM, completion

CHEST = ["synpic100176.jpg", "synpic100228.jpg", "synpic12210.jpg", "synpic13385.jpg"]
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 FINDINGS:
 The heart is normal in size.  The lungs are clear.
 No pleural effusion.

 IMPRESSION:
 No acute cardiopulmonary process.
"""
NO_SECTIONS = " FINAL REPORT\n EXAMINATION: CHEST\n WET READ: pending.\n"


def _copy(shared_data: Path, name: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_data / "vqa_rad" / "images" / name, target)


def lay_out_mimic(shared_data: Path, root: Path) -> Path:
    """MIMIC-CXR-JPG's public layout: two test studies with reports (one with two views), a
    test study whose report has neither findings nor impression, and a train study."""
    studies = [
        ("10000032", "50414267", ["d1", "d2"], REPORT, "test"),
        ("11000011", "51000001", ["d3"], REPORT.replace("normal in size", "enlarged"), "test"),
        ("12000022", "52000002", ["d4"], NO_SECTIONS, "test"),
        ("13000033", "53000003", ["d5"], REPORT, "train"),
    ]
    rows = []
    for index, (subject, study, dicoms, text, split) in enumerate(studies):
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        for offset, dicom in enumerate(dicoms):
            _copy(shared_data, CHEST[(index + offset) % 4], folder / f"s{study}" / f"{dicom}.jpg")
            rows.append(
                {"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split}
            )
        (folder / f"s{study}.txt").write_text(text)
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt", newline="") as handle:
        writer = csv.DictWriter(handle, ["dicom_id", "study_id", "subject_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def lay_out_chexpert_plus(shared_data: Path, root: Path, **row: str) -> Path:
    """CheXpert Plus's report table (the columns read, plus others it has) and its PNG release:
    two valid-split studies, one train study."""
    columns = ["path_to_image", "deid_patient_id", "section_findings", "section_impression"]
    columns.append("split")
    rows = [
        [
            "valid/patient64541/study1/view1_frontal.jpg",
            "p1",
            "Lungs are clear.",
            "Normal.",
            "valid",
        ],
        ["valid/patient64542/study1/view1_frontal.jpg", "p2", "", "Cardiomegaly.", "valid"],
        ["train/patient00001/study1/view1_frontal.jpg", "p3", "Clear.", "Normal.", "train"],
    ]
    for index, values in enumerate(rows):
        png = (root / "PNG" / values[0]).with_suffix(".png")
        _copy(shared_data, CHEST[index], png)
    if row:
        rows.append([row.get(name, "") for name in columns])
    with (root / "df_chexpert_plus_240401.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return root


def lay_out_medevalkit(shared_data: Path, root: Path, *, many: bool) -> Path:
    """MedEvalKit's MIMIC_CXR (``many``: a list of images per study) or CheXpert_Plus layout."""
    (root / "images").mkdir(parents=True)
    studies = []
    for index in range(3):
        names = [f"s{index}_{view}.jpg" for view in range(2 if many else 1)]
        for offset, name in enumerate(names):
            _copy(shared_data, CHEST[index + offset], root / "images" / name)
        studies.append(
            {
                "image": names if many else names[0],
                "findings": "" if index == 2 else f"Finding {index}.",
                "impression": "" if index == 2 else f"Impression {index}.",
            }
        )
    (root / "test.json").write_text(json.dumps(studies))
    return root


# -- loading -----------------------------------------------------------------------------------


def test_mimic_cxr_public_layout(shared_data: Path, tmp_path: Path) -> None:
    root = lay_out_mimic(shared_data, tmp_path / "mimic")
    samples = load_benchmark("MIMIC-CXR", root, tmp_path / "cache")
    assert [s.id for s in samples] == ["mimic-cxr-s50414267", "mimic-cxr-s51000001"]
    first = samples[0]
    assert [Path(p).name for p in first.images] == ["d1.jpg", "d2.jpg"] and first.image_labels
    assert first.gold == (
        "Findings: The heart is normal in size. The lungs are clear. No pleural effusion. "
        "Impression: No acute cardiopulmonary process.."
    )
    assert first.prompt == prompts.MIMIC_REPORT_PROMPT
    assert first.prompt.startswith("\n        You are") and first.prompt.endswith("{}.\n        ")
    assert len(first.exclude_image_sha256) == 2 and first.kind == "report"
    assert "enlarged" in samples[1].gold


def test_mimic_reports_can_sit_in_their_own_tree(shared_data: Path, tmp_path: Path) -> None:
    root = lay_out_mimic(shared_data, tmp_path / "mimic")
    for report in (root / "files").rglob("s*.txt"):
        moved = root / "mimic-cxr-reports" / report.relative_to(root)
        moved.parent.mkdir(parents=True, exist_ok=True)
        report.rename(moved)
    assert len(load_benchmark("MIMIC-CXR", root, tmp_path / "cache")) == 2
    (root / "mimic-cxr-reports" / "files" / "p10" / "p10000032" / "s50414267.txt").unlink()
    with pytest.raises(InputError, match="no report for study s50414267"):
        load_benchmark("MIMIC-CXR", root, tmp_path / "cache")


def test_report_sections_read_mimic_headings() -> None:
    sections = report_sections(REPORT)
    assert (
        sections["findings"].startswith("The heart is normal") and "\n" not in sections["findings"]
    )
    assert sections["impression"] == "No acute cardiopulmonary process."
    assert "findings" not in report_sections(NO_SECTIONS)


def test_chexpert_plus_public_layout(shared_data: Path, tmp_path: Path) -> None:
    root = lay_out_chexpert_plus(shared_data, tmp_path / "chexpert")
    samples = load_benchmark("CheXpert-Plus", root, tmp_path / "cache")
    assert [s.id for s in samples] == [
        "chexpert-plus-valid-patient64541-study1-view1_frontal",
        "chexpert-plus-valid-patient64542-study1-view1_frontal",
    ]
    assert samples[0].images[0].endswith("PNG/valid/patient64541/study1/view1_frontal.png")
    assert samples[1].gold == "Findings:  Impression: Cardiomegaly.."
    # One image, MedEvalKit's 'image' layout: no label, the shared report prompt.
    assert not samples[0].image_labels and samples[0].prompt == prompts.REPORT_PROMPT


@pytest.mark.parametrize(
    ("row", "error"),
    [
        (
            {"path_to_image": "../../etc/passwd", "split": "valid", "section_impression": "x"},
            "not inside",
        ),
        (
            {"path_to_image": "valid/gone.jpg", "split": "valid", "section_impression": "x"},
            "no image",
        ),
    ],
)
def test_chexpert_plus_refuses_paths_it_cannot_trust(
    shared_data: Path, tmp_path: Path, row: dict[str, str], error: str
) -> None:
    root = lay_out_chexpert_plus(shared_data, tmp_path / "chexpert", **row)
    with pytest.raises(InputError, match=error):
        load_benchmark("CheXpert-Plus", root, tmp_path / "cache")


def test_a_table_without_the_columns_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "df_chexpert_plus_240401.csv").write_text("path,report\na.jpg,text\n")
    with pytest.raises(InputError, match="no column path_to_image") as raised:
        load_benchmark("CheXpert-Plus", tmp_path, tmp_path / "cache")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("name", "many"), [("MIMIC-CXR", True), ("CheXpert-Plus", False)])
def test_medevalkit_layouts(shared_data: Path, tmp_path: Path, name: str, many: bool) -> None:
    root = lay_out_medevalkit(shared_data, tmp_path / name, many=many)
    samples = load_benchmark(name, root, tmp_path / "cache")
    assert len(samples) == 2  # the study with neither findings nor impression is skipped
    assert [len(s.images) for s in samples] == [2 if many else 1] * 2
    assert samples[0].gold == "Findings: Finding 0. Impression: Impression 0.."
    assert samples[0].image_labels is many
    expected = prompts.MIMIC_REPORT_PROMPT if many else prompts.REPORT_PROMPT
    assert samples[0].prompt == expected


# -- asking --------------------------------------------------------------------------------


@pytest.mark.slow  # the report metrics start METEOR's Java
def test_plain_mimic_cxr_run_sends_medevalkits_prompt_and_scores_reports(
    shared_data: Path, tmp_path: Path
) -> None:
    root = lay_out_mimic(shared_data, tmp_path / "mimic")
    samples = load_benchmark("MIMIC-CXR", root, tmp_path / "cache")
    said = "Findings: The heart is normal in size. The lungs are clear. Impression: Normal."
    vllm = FakeVLLM(completion(said))
    client = vllm.client(Settings(home=tmp_path / "home", vlm="fake-vlm", max_retries=0))
    out = tmp_path / "out"
    config = EvalConfig(benchmarks=["MIMIC-CXR"], modes=["plain"], out=out, model="fake-vlm")
    asyncio.run(run_evaluation(config, {"MIMIC-CXR": samples}, model=client, answerer=None))
    two_views = next(body for _, body in vllm.requests if len(body["messages"][-1]["content"]) == 5)
    parts: list[dict[str, Any]] = two_views["messages"][-1]["content"]
    assert [p.get("text") for p in parts] == [
        "<image_1>: ",
        None,
        "<image_2>: ",
        None,
        prompts.MIMIC_REPORT_PROMPT,
    ]
    metrics = write_report(out)
    values = metrics["benchmarks"]["MIMIC-CXR"]["modes"]["plain"]["report_metrics"]["values"]
    assert 0 < values["bleu1"] < 1 and 0 < values["rougeL"] < 1
    assert "## Report generation" in (out / "report.md").read_text()
    shape = TypeAdapter(Metrics)  # report metrics are declared too (metric_types.py)
    raw = json.loads((out / "metrics.json").read_text())
    assert shape.dump_python(shape.validate_python(raw), mode="json") == raw


DRAFT = """TECHNIQUE: PA chest radiograph.
FINDINGS:
- Heart: normal in size [1].
- Lungs: clear, no effusion [1, 2].
IMPRESSION: No acute cardiopulmonary process [1]."""


def test_agent_mode_drafts_reports_on_suwen_reports_path(shared_data: Path, tmp_path: Path) -> None:
    root = lay_out_chexpert_plus(shared_data, tmp_path / "chexpert")
    samples = load_benchmark("CheXpert-Plus", root, tmp_path / "cache")
    case = case_hit("case-1", "Normal chest radiograph: heart normal in size, lungs clear.")
    model = FakeModel().script("report", DRAFT)
    agent = make_agent(tmp_path, model, images=FakeImageSearch([(case, "9" * 64)]))
    out = tmp_path / "out"
    config = EvalConfig(benchmarks=["CheXpert-Plus"], modes=["agent"], out=out)
    asyncio.run(
        run_evaluation(
            config, {"CheXpert-Plus": samples}, model=None, answerer=AgentAnswerer(agent)
        )
    )
    assert len(model.calls_for("report")) == 2 and not model.calls_for("answer")
    records = read_records(samples_path(out, "CheXpert-Plus", "agent"))
    assert len(records) == 2
    for record in records:
        assert record.response == (
            "Findings: Heart: normal in size. Lungs: clear, no effusion. "
            "Impression: No acute cardiopulmonary process.."
        )
        assert record.full_answer.startswith("TECHNIQUE") and record.model_calls >= 2
        assert record.metrics["bleu1"] > 0
    # The report task, not MedEvalKit's prompt, reaches the report prompt.
    report_prompt = model.calls_for("report")[0].last
    assert "Please generate a report" not in report_prompt


def test_a_report_call_that_fails_is_a_failure_not_an_empty_report(
    shared_data: Path, tmp_path: Path
) -> None:
    root = lay_out_chexpert_plus(shared_data, tmp_path / "chexpert")
    samples = load_benchmark("CheXpert-Plus", root, tmp_path / "cache")
    model = FakeModel().script("report", Fail(ModelError("vLLM answered 503")))
    agent = make_agent(tmp_path, model)
    out = tmp_path / "out"
    config = EvalConfig(benchmarks=["CheXpert-Plus"], modes=["agent"], out=out)
    summaries = asyncio.run(
        run_evaluation(
            config, {"CheXpert-Plus": samples}, model=None, answerer=AgentAnswerer(agent)
        )
    )
    assert [len(s.failed) for s in summaries] == [2] and "503" in summaries[0].failed[0][1]
    assert read_records(samples_path(out, "CheXpert-Plus", "agent")) == []


def test_scored_report_keeps_findings_and_impression_only() -> None:
    assert scored_report(DRAFT) == (
        "Findings: Heart: normal in size. Lungs: clear, no effusion. "
        "Impression: No acute cardiopulmonary process.."
    )
    assert scored_report("") == ""
    assert (
        scored_report("The lungs are clear [3].") == "Findings: The lungs are clear. Impression: ."
    )
