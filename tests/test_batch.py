"""Batch answering: every question source, every kind of bad item, resume, and concurrency."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from suwen.batch import (
    BatchProgress,
    BatchSummary,
    answer_questions,
    load_questions,
    open_answer_log,
    read_prior_output,
    run_batch,
)
from suwen.errors import InputError, ModelError
from suwen.types import AgentResult, Question


def _image(path: Path, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (40, 80, 120)).save(path)
    return path


def _jsonl(path: Path, rows: list[object]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class EchoModel:
    """Answers with the question text; can fail or be slow for chosen questions."""

    def __init__(self, fail_on: str | None = None, delay: float = 0.0) -> None:
        self.fail_on = fail_on
        self.delay = delay
        self.asked: list[Question] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, question: Question) -> AgentResult:
        self.asked.append(question)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail_on and self.fail_on in question.text:
                raise ModelError("model server returned 500 for this request")
            return AgentResult(question=question.text, answer=f"answer to {question.text}")
        finally:
            self.in_flight -= 1


def _run(folder: Path, out: Path, model: EchoModel, **kwargs):
    questions = load_questions(folder, kwargs.pop("questions_file", None))
    return asyncio.run(run_batch(questions, out, model, **kwargs))


# --- question sources -------------------------------------------------------------------------


def test_jsonl_source_reads_images_options_and_text_only_questions(tmp_path: Path) -> None:
    _image(tmp_path / "img" / "a.png")
    _image(tmp_path / "img" / "b.png")
    _jsonl(
        tmp_path / "questions.jsonl",
        [
            {"id": "q1", "image": "img/a.png", "question": " Is there a fracture? "},
            {"id": 2, "images": ["img/a.png", "img/b.png"], "question": "Compare prior."},
            {"id": "q3", "question": "Which nerve?", "options": {"A": "ulnar", "B": "radial"}},
            {"id": "q4", "question": "Pick one", "options": ["yes", "no", "maybe"]},
        ],
    )
    items = {item.id: item for item in load_questions(tmp_path).items}
    assert set(items) == {"q1", "2", "q3", "q4"}
    q1 = items["q1"].question
    assert q1 is not None and q1.text == "Is there a fracture?"
    assert q1.images == [str((tmp_path / "img" / "a.png").resolve())]
    assert items["q1"].images == ("img/a.png",)
    assert items["2"].question is not None and len(items["2"].question.images) == 2
    q3 = items["q3"].question
    assert q3 is not None and q3.images == [] and q3.answer_format.kind == "choice"
    assert q3.answer_format.options == {"A": "ulnar", "B": "radial"}
    q4 = items["q4"].question
    assert q4 is not None and q4.answer_format.options == {"A": "yes", "B": "no", "C": "maybe"}
    assert all(item.error is None for item in items.values())


def test_csv_source_with_image_lists_and_options(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    (tmp_path / "questions.csv").write_text(
        "id,images,question,options\n"
        'c1,a.png;b.png,"Is it worse, than before?",\n'
        'c2,a.png,Which?,"{""A"": ""left"", ""B"": ""right""}"\n'
        "c3,,Text only?,yes|no\n",
        encoding="utf-8",
    )
    items = {item.id: item for item in load_questions(tmp_path).items}
    c1 = items["c1"].question
    assert c1 is not None and c1.text == "Is it worse, than before?" and len(c1.images) == 2
    c2 = items["c2"].question
    assert c2 is not None and c2.answer_format.options == {"A": "left", "B": "right"}
    c3 = items["c3"].question
    assert (
        c3 is not None and c3.images == [] and c3.answer_format.options == {"A": "yes", "B": "no"}
    )


def test_sidecar_txt_beside_each_image(tmp_path: Path) -> None:
    _image(tmp_path / "chest" / "case1.png")
    (tmp_path / "chest" / "case1.txt").write_text("Any pneumothorax?\n", encoding="utf-8")
    _image(tmp_path / "case2.jpg")
    (tmp_path / "case2.txt").write_text("Where is the lesion?", encoding="utf-8")
    _image(tmp_path / "no_question.png")
    (tmp_path / "README.txt").write_text("not a question: no image beside it", encoding="utf-8")
    questions = load_questions(tmp_path)
    items = {item.id: item for item in questions.items}
    assert set(items) == {"chest/case1", "case2"}
    case1 = items["chest/case1"].question
    assert case1 is not None and case1.text == "Any pneumothorax?"
    assert case1.images == [str((tmp_path / "chest" / "case1.png").resolve())]
    assert any("without a sidecar" in note for note in questions.notes)


def test_sidecar_for_dicom_series_folder_and_nifti(shared_data: Path, tmp_path: Path) -> None:
    shutil.copytree(shared_data / "imaging" / "dicom" / "monai_ct_series", tmp_path / "ct")
    (tmp_path / "ct.txt").write_text("Is there a liver lesion?", encoding="utf-8")
    shutil.copy(shared_data / "imaging" / "nifti" / "anatomical.nii", tmp_path / "brain.nii")
    (tmp_path / "brain.txt").write_text("Which sequence is this?", encoding="utf-8")
    questions = load_questions(tmp_path)
    images = {item.id: item.images for item in questions.items}
    assert images == {"ct": ("ct",), "brain": ("brain.nii",)}
    assert not questions.notes  # the series' own files are not counted as lonely images
    summary = _run(tmp_path, tmp_path / "out.jsonl", EchoModel())
    assert summary.answered == 2 and not summary.errors


def test_questions_option_names_another_file_with_paths_relative_to_folder(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "images"
    _image(folder / "x.png")
    other = _jsonl(tmp_path / "mine.jsonl", [{"id": "x", "image": "x.png", "question": "Q?"}])
    (item,) = load_questions(folder, other).items
    assert item.question is not None
    assert item.question.images == [str((folder / "x.png").resolve())]


def test_unusable_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        load_questions(tmp_path / "missing")
    with pytest.raises(InputError, match="no questions found"):
        load_questions(tmp_path)
    (tmp_path / "questions.csv").write_text("name,text\nx,y\n", encoding="utf-8")
    with pytest.raises(InputError, match="lacks column"):
        load_questions(tmp_path)
    _jsonl(tmp_path / "questions.jsonl", [{"id": "a", "question": "q"}])
    with pytest.raises(InputError, match=r"both questions\.jsonl and questions\.csv"):
        load_questions(tmp_path)
    with pytest.raises(InputError, match="must end in"):
        load_questions(tmp_path, _jsonl(tmp_path / "q.txt", []))


# --- failures become error lines ---------------------------------------------------------------


def _folder_with_every_failure(folder: Path) -> None:
    _image(folder / "good.png")
    (folder / "broken.png").write_bytes(b"this is not a PNG at all")
    outside = _image(folder.parent / "outside.png")
    (folder / "link.png").symlink_to(outside)
    lines = [
        json.dumps({"id": "ok", "image": "good.png", "question": "Is it normal?"}),
        json.dumps({"id": "missing", "image": "nope.png", "question": "Q?"}),
        json.dumps({"id": "unreadable", "image": "broken.png", "question": "Q?"}),
        json.dumps({"id": "empty", "image": "good.png", "question": "   "}),
        json.dumps({"id": "noquestion", "image": "good.png"}),
        '{"id": "torn", "question": ',
        json.dumps([1, 2, 3]),
        json.dumps({"question": "no id"}),
        json.dumps({"id": "dup", "question": "first"}),
        json.dumps({"id": "dup", "question": "second"}),
        json.dumps({"id": "escape", "image": "../outside.png", "question": "Q?"}),
        json.dumps(
            {"id": "absolute", "image": str(folder.parent / "outside.png"), "question": "Q"}
        ),
        json.dumps({"id": "symlink", "image": "link.png", "question": "Q?"}),
        json.dumps({"id": "modelfail", "question": "please FAIL here"}),
        json.dumps({"id": "badoptions", "question": "Q?", "options": 7}),
    ]
    data = "\n".join(lines).encode("utf-8") + b"\n"
    data += b'{"id": "latin1", "question": "caf\xe9?"}\n'
    (folder / "questions.jsonl").write_bytes(data)


def test_every_failure_kind_becomes_an_error_line_and_the_run_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    _folder_with_every_failure(folder)
    out = tmp_path / "answers.jsonl"
    seen: list[BatchProgress] = []
    model = EchoModel(fail_on="FAIL")
    summary = _run(folder, out, model, concurrency=3, on_progress=lambda p: seen.append(p))

    rows = {row["id"]: row for row in _read_out(out)}
    errors = {key: row["error"] for key, row in rows.items() if "error" in row}
    assert rows["ok"]["answer"] == "answer to Is it normal?"
    assert rows["ok"]["images"] == ["good.png"]
    expected = {
        "missing": "not found",
        "unreadable": "broken.png",
        "empty": "empty question",
        "noquestion": "no 'question'",
        "questions.jsonl:6": "malformed JSON",
        "questions.jsonl:7": "JSON object",
        "questions.jsonl:8": "missing or invalid 'id'",
        "dup": "duplicate id 'dup'",
        "escape": "outside the folder",
        "absolute": "outside the folder",
        "symlink": "outside the folder",
        "modelfail": "model server returned 500",
        "badoptions": "'options'",
        "latin1": "not valid UTF-8",
    }
    assert set(errors) == set(expected)
    for key, fragment in expected.items():
        assert fragment in errors[key], (key, errors[key])
    # Only the good question and the one the model failed on ever reached the model.
    assert sorted(q.text for q in model.asked) == ["Is it normal?", "please FAIL here"]
    assert summary.answered == 1 and len(summary.errors) == len(expected) and summary.complete
    assert seen[-1].done == seen[-1].total == len(rows) and seen[-1].errors == len(expected)


def test_error_lines_are_retried_and_answers_kept_one_line_per_id(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "questions.jsonl",
        [{"id": f"q{i}", "question": f"question {i}"} for i in range(6)],
    )
    out = tmp_path / "out.jsonl"
    first = _run(tmp_path, out, EchoModel(fail_on="question 3"))
    assert [e[0] for e in first.errors] == ["q3"]

    second_model = EchoModel()
    second = _run(tmp_path, out, second_model)
    assert [q.text for q in second_model.asked] == ["question 3"]
    assert second.skipped == 5 and second.answered == 1 and not second.errors
    rows = _read_out(out)
    assert sorted(row["id"] for row in rows) == [f"q{i}" for i in range(6)]
    assert all("error" not in row for row in rows)

    third_model = EchoModel()
    third = _run(tmp_path, out, third_model)
    assert third_model.asked == [] and third.skipped == 6 and third.complete


def test_torn_last_line_is_dropped_and_that_question_asked_again(tmp_path: Path) -> None:
    _jsonl(tmp_path / "questions.jsonl", [{"id": k, "question": k} for k in "abc"])
    out = tmp_path / "out.jsonl"
    answered = json.dumps({"id": "a", "answer": "A"}) + "\n"
    out.write_text(answered + '{"id": "b", "answ', encoding="utf-8")
    model = EchoModel()
    summary = _run(tmp_path, out, model)
    assert sorted(q.text for q in model.asked) == ["b", "c"]
    assert any("partly written" in note for note in summary.notes)
    rows = _read_out(out)
    assert sorted(row["id"] for row in rows) == ["a", "b", "c"]
    assert rows[0] == {"id": "a", "answer": "A"}


def test_prior_output_classification() -> None:
    data = (
        b'{"id": "a", "answer": "x"}\n'
        b'{"id": "b", "error": "boom"}\n'
        b"garbage someone wrote\n"
        b'{"id": "c", "answer": "y"}\n'
        b'{"id": "d", "ans'
    )
    prior, keep = read_prior_output(data)
    assert prior.answered == {"a", "c"} and prior.error_ids == {"b"}
    assert prior.torn_tail and prior.unreadable_lines == 1
    assert keep == [
        b'{"id": "a", "answer": "x"}',
        b"garbage someone wrote",
        b'{"id": "c", "answer": "y"}',
    ]


def test_second_writer_on_the_same_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with open_answer_log(out), pytest.raises(InputError, match="another suwen batch"):  # noqa: SIM117
        with open_answer_log(out):
            pass
    with open_answer_log(out) as log:  # released after the first one closed
        log.append({"id": "x", "answer": "y"})
    assert _read_out(out) == [{"id": "x", "answer": "y"}]


def test_requests_run_concurrently_up_to_the_limit(tmp_path: Path) -> None:
    _jsonl(tmp_path / "questions.jsonl", [{"id": str(i), "question": f"q{i}"} for i in range(24)])
    model = EchoModel(delay=0.05)
    summary = _run(tmp_path, tmp_path / "out.jsonl", model, concurrency=6)
    assert model.max_in_flight == 6
    assert summary.answered == 24
    # 24 questions of 50 ms each, 6 at a time: about 0.2 s, far from the 1.2 s of a serial loop.
    assert summary.seconds < 0.8
    with pytest.raises(InputError, match="at least 1"):
        _run(tmp_path, tmp_path / "out2.jsonl", model, concurrency=0)


def test_real_vqa_rad_images_load(shared_data: Path, tmp_path: Path) -> None:
    images = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:2]
    for image in images:
        shutil.copy(image, tmp_path / image.name)
        (tmp_path / image.with_suffix(".txt").name).write_text("Is this normal?", "utf-8")
    model = EchoModel()
    summary = _run(tmp_path, tmp_path / "out.jsonl", model)
    assert summary.answered == 2 and not summary.errors


def test_an_empty_answer_is_recorded_as_an_error(tmp_path: Path) -> None:
    _jsonl(tmp_path / "questions.jsonl", [{"id": "a", "question": "Anything?"}])

    async def silent(question: Question) -> AgentResult:
        return AgentResult(question=question.text, answer="  \n")

    questions = load_questions(tmp_path)
    summary = asyncio.run(run_batch(questions, tmp_path / "out.jsonl", silent))
    assert summary.errors == [("a", "the model's answer was empty")]
    assert _read_out(tmp_path / "out.jsonl") == [
        {"id": "a", "error": "the model's answer was empty"}
    ]


def test_the_model_is_started_only_when_a_pending_question_can_be_asked(tmp_path: Path) -> None:
    _jsonl(tmp_path / "questions.jsonl", [{"id": "a", "question": "Q?"}, {"id": "b"}])
    questions = load_questions(tmp_path)
    out = tmp_path / "out.jsonl"
    started: list[EchoModel] = []

    @asynccontextmanager
    async def start() -> AsyncIterator[EchoModel]:
        started.append(EchoModel())
        yield started[-1]

    def run_once() -> BatchSummary:
        with open_answer_log(out) as log:
            return asyncio.run(answer_questions(questions, log, start))

    first = run_once()
    assert len(started) == 1 and [q.text for q in started[0].asked] == ["Q?"]
    assert first.answered == 1 and [e[0] for e in first.errors] == ["b"]
    # Only the unaskable item is left: its error is recorded again without starting a model.
    again = run_once()
    assert len(started) == 1 and again.skipped == 1 and [e[0] for e in again.errors] == ["b"]
