"""Prior and current studies: roles and dates reach the model, look's changes reach the answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from typer.testing import CliRunner

from suwen import runtime
from suwen.agent.prompts import ANSWER_COMPARISON, LOOK_COMPARISON
from suwen.cli import app
from suwen.commands.answer_view import plain_result
from suwen.errors import InputError
from suwen.studies import assign_roles, study_views
from suwen.types import AgentResult
from tests.agent_helpers import ask, cases, make_agent, question
from tests.fake_model import FakeModel
from tests.fake_search import FakeImageSearch
from tests.test_ask import Opened


def dicom_on(shared_data: Path, path: Path, date: str) -> Path:
    dataset = pydicom.dcmread(shared_data / "imaging" / "dicom" / "CT_small.dcm")
    dataset.StudyDate = date
    dataset.save_as(path)
    return path


@pytest.fixture()
def two_dates(tmp_path: Path, shared_data: Path) -> tuple[str, str]:
    old = dicom_on(shared_data, tmp_path / "old.dcm", "20010102")
    new = dicom_on(shared_data, tmp_path / "new.dcm", "20030405")
    return str(old), str(new)


@pytest.fixture()
def opened(suwen_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Opened]:
    monkeypatch.setenv("COLUMNS", "200")
    fakes = Opened()
    previous = runtime.install_backends(fakes.backends())
    yield fakes
    runtime.install_backends(previous)


@pytest.fixture()
def jpeg(shared_data: Path) -> str:
    return str(sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0])


def test_study_dates_order_the_studies_when_no_role_is_given(two_dates: tuple[str, str]) -> None:
    old, new = two_dates
    studies = assign_roles([new, old], [])
    assert [(s.path, s.role, s.date) for s in studies] == [
        (old, "prior", "2001-01-02"),
        (new, "current", "2003-04-05"),
    ]
    labels = [label for label, _ in study_views(studies, 6)]
    assert labels == ["prior study (2001-01-02): old.dcm", "current study (2003-04-05): new.dcm"]


def test_an_explicit_prior_wins_and_one_date_orders_nothing(
    two_dates: tuple[str, str], jpeg: str
) -> None:
    old, new = two_dates
    assert [s.role for s in assign_roles([old], [new])] == ["prior", "current"]
    same = assign_roles([old, old], [])  # one date: no comparison, no labels
    assert [s.role for s in same] == ["current", "current"]
    assert [label for label, _ in study_views(same, 6)] == ["old.dcm", "old.dcm"]
    dated = assign_roles([jpeg], [jpeg], {jpeg: "2020-01-01"})
    assert dated[0].label == "prior study (2020-01-01)"
    assert assign_roles([jpeg], [new])[1].label == "current study (date unknown)"


CHANGES = {
    "modality": "CT",
    "body_region": "chest",
    "findings": ["3 cm nodule right upper lobe"],
    "candidates": ["neoplasm"],
    "to_check": [],
    "prior_findings": ["2 cm nodule right upper lobe"],
    "changes": [
        {"kind": "larger", "finding": "right upper lobe nodule, 2 cm to 3 cm"},
        {"kind": "new", "finding": "small left pleural effusion"},
    ],
}


def test_roles_reach_the_model_and_the_changes_reach_the_answer(
    tmp_path: Path, two_dates: tuple[str, str]
) -> None:
    old, new = two_dates
    model = FakeModel().script("look", json.dumps(CHANGES))
    search = FakeImageSearch(cases())
    agent = make_agent(tmp_path, model, images=search)
    result = ask(agent, question("Has the nodule grown?", images=[new], prior_images=[old]))
    look = model.calls_for("look")[0].messages[-1]
    assert look.image_labels == [
        "Image 1: prior study (2001-01-02): old.dcm",
        "Image 2: current study (2003-04-05): new.dcm",
    ]
    assert LOOK_COMPARISON in look.text
    assert [c.kind for c in result.findings.changes] == ["larger", "new"]  # type: ignore[union-attr]
    answer = model.calls_for("answer")[0]
    assert "Changes since the prior study: larger: right upper lobe nodule" in answer.text
    assert "Prior study findings: 2 cm nodule right upper lobe" in answer.text
    assert ANSWER_COMPARISON in answer.text
    assert answer.messages[-1].image_labels == look.image_labels
    assert len(search.calls) == 1  # similar cases: the current study only
    text = plain_result(result)
    assert "Comparison with the prior study:\n- larger: right upper lobe nodule" in text


def test_a_question_without_a_prior_keeps_its_prompts(tmp_path: Path, jpeg: str) -> None:
    model = FakeModel()
    ask(make_agent(tmp_path, model), question("What is shown?", images=[jpeg]))
    look = model.calls_for("look")[0]
    assert look.messages[-1].image_labels == [] and LOOK_COMPARISON not in look.text


def test_ask_prior_reaches_the_question_and_the_view(
    opened: Opened,
    two_dates: tuple[str, str],
) -> None:
    old, new = two_dates
    opened.model.script("look", json.dumps(CHANGES))
    result = CliRunner().invoke(app, ["ask", "--image", new, "--prior", old, "Any change?"])
    assert result.exit_code == 0, result.output
    assert "Comparison with the prior study" in result.stdout and "larger" in result.stdout
    as_json = CliRunner().invoke(
        app, ["ask", "--image", new, "--prior", old, "Any change?", "--json"]
    )
    parsed = AgentResult.model_validate_json(as_json.stdout)
    assert parsed.findings is not None and parsed.findings.changes[1].kind == "new"


def test_ask_prior_without_a_current_study_is_refused(
    opened: Opened,
    two_dates: tuple[str, str],
) -> None:
    result = CliRunner().invoke(app, ["ask", "--prior", two_dates[0], "Any change?"])
    assert result.exit_code == 2 and "--prior: give the current study with --image" in result.output


def batch_items(folder: Path, jpeg: str, rows: list[dict[str, object]]) -> dict[str, Any]:
    """The batch items of ``rows`` written as a questions file in ``folder``, where copies of
    ``jpeg`` named old.jpg, new.jpg and older.jpg are the images, by id."""
    from suwen.batch import load_questions

    for name in ("old.jpg", "new.jpg", "older.jpg"):
        (folder / name).write_bytes(Path(jpeg).read_bytes())
    (folder / "questions.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    return {item.id: item for item in load_questions(folder).items}


def test_batch_lines_name_priors_by_field_or_by_role(tmp_path: Path, jpeg: str) -> None:
    rows: list[dict[str, object]] = [
        {"id": "a", "image": "new.jpg", "prior": "old.jpg", "question": "Changed?"},
        {
            "id": "b",
            "images": [
                {"path": "older.jpg", "role": "prior", "date": "20190101"},
                {"path": "new.jpg", "date": "2021-02-03"},
            ],
            "question": "Changed?",
        },
        {"id": "c", "images": [{"path": "new.jpg", "role": "earlier"}], "question": "?"},
        {"id": "d", "images": [{"path": "new.jpg", "date": "last week"}], "question": "?"},
    ]
    items = batch_items(tmp_path, jpeg, rows)
    root = tmp_path.resolve()
    a = items["a"].question
    assert a is not None and a.images == [str(root / "new.jpg")]
    assert a.prior_images == [str(root / "old.jpg")] and items["a"].images == ("old.jpg", "new.jpg")
    b = items["b"].question
    assert b is not None and b.prior_images == [str(root / "older.jpg")]
    assert b.image_dates == {
        str(root / "older.jpg"): "2019-01-01",
        str(root / "new.jpg"): "2021-02-03",
    }
    assert "role 'earlier' must be 'prior' or 'current'" in (items["c"].error or "")
    assert "date 'last week' is not YYYY-MM-DD" in (items["d"].error or "")


def test_chat_prior_is_compared_with_the_attached_study(tmp_path: Path, jpeg: str) -> None:
    from suwen.chat_session import ChatSession

    model = FakeModel().script("look", json.dumps(CHANGES))
    session = ChatSession(make_agent(tmp_path, model))
    with pytest.raises(InputError, match="/prior needs a path"):
        session.attach_prior(" ")
    session.attach_prior(jpeg)
    session.attach(jpeg)
    result = asyncio.run(session.ask("What changed?"))
    labels = model.calls_for("look")[0].messages[-1].image_labels
    assert [label.split(":")[1].strip() for label in labels] == [
        "prior study (date unknown)",
        "current study (date unknown)",
    ]
    assert result.findings is not None and result.findings.changes[0].kind == "larger"
    session.new_thread()
    assert session.priors == []


def test_ask_dates_from_the_command_line_reach_the_labels(
    opened: Opened, tmp_path: Path, jpeg: str, two_dates: tuple[str, str]
) -> None:
    """A JPEG has no StudyDate: ``--date`` / ``--prior-date`` date the studies; a date given
    on the command line is the study's date even over a DICOM StudyDate."""
    old = tmp_path / "old.jpg"
    old.write_bytes(Path(jpeg).read_bytes())
    argv = ["ask", "--image", jpeg, "--prior", str(old), "--date", "20210203"]
    result = CliRunner().invoke(app, [*argv, "--prior-date", "2019-01-01", "Any change?"])
    assert result.exit_code == 0, result.output
    labels = opened.model.calls_for("look")[0].messages[-1].image_labels
    assert labels == [
        "Image 1: prior study (2019-01-01): old.jpg",
        f"Image 2: current study (2021-02-03): {Path(jpeg).name}",
    ]
    dicom_old, dicom_new = two_dates
    argv = ["ask", "--image", dicom_new, "--prior", dicom_old, "--prior-date", "2002-06-30"]
    assert CliRunner().invoke(app, [*argv, "Grown?"]).exit_code == 0
    labels = opened.model.calls_for("look")[-1].messages[-1].image_labels
    assert labels[0] == "Image 1: prior study (2002-06-30): old.dcm"
    assert labels[1] == "Image 2: current study (2003-04-05): new.dcm"  # its own StudyDate


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--date", "2021-02-30"], "--date: date '2021-02-30' is not YYYY-MM-DD"),
        (["--prior-date", "last week"], "--prior-date: date 'last week' is not YYYY-MM-DD"),
        (["--date", "2021-01-01", "--date", "2021-01-02"], "--date: 2 dates for 1 --image"),
        (["--prior-date", "2021-01-01"], "--prior-date: no --prior image to date"),
    ],
)
def test_ask_bad_dates_are_refused_in_one_line_naming_the_flag(
    opened: Opened, jpeg: str, extra: list[str], message: str
) -> None:
    result = CliRunner().invoke(app, ["ask", "--image", jpeg, *extra, "Any change?"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert opened.model.calls == []  # refused before any model call


def test_batch_line_dates_date_the_studies_of_plain_fields(tmp_path: Path, jpeg: str) -> None:
    line = {"image": "new.jpg", "prior": "old.jpg", "question": "Changed?"}
    rows: list[dict[str, object]] = [
        {"id": "a", **line, "study_date": "2021-02-03", "prior_date": "20190101"},
        {"id": "b", **line, "prior_date": "2019-02-29"},
        {"id": "c", "image": "new.jpg", "question": "?", "prior_date": "2019-01-01"},
    ]
    items = batch_items(tmp_path, jpeg, rows)
    root = tmp_path.resolve()
    a = items["a"].question
    assert a is not None and a.image_dates == {
        str(root / "new.jpg"): "2021-02-03",
        str(root / "old.jpg"): "2019-01-01",
    }
    assert "'prior_date': date '2019-02-29' is not YYYY-MM-DD" in (items["b"].error or "")
    assert "'prior_date' given without the images it dates" in (items["c"].error or "")


def test_chat_dates_given_at_start_or_typed_label_the_studies(tmp_path: Path, jpeg: str) -> None:
    from suwen.chat_session import ChatSession

    model = FakeModel().script("look", json.dumps(CHANGES))
    session = ChatSession(make_agent(tmp_path, model))
    old = tmp_path / "old.jpg"
    old.write_bytes(Path(jpeg).read_bytes())
    session.attach_prior(str(old), "2019-01-01")
    session.attach(f"{jpeg} --date 20210203")  # as typed after /image
    with pytest.raises(InputError, match="/prior --date: date 'yesterday' is not YYYY-MM-DD"):
        session.attach_prior(f"{old} --date yesterday")
    asyncio.run(session.ask("What changed?"))
    labels = model.calls_for("look")[0].messages[-1].image_labels
    assert [label.split(": ", 2)[1] for label in labels] == [
        "prior study (2019-01-01)",
        "current study (2021-02-03)",
    ]
