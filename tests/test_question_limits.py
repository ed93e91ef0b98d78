"""Questions are bounded and question files streamed (issue 17, item 8, the text part).

A question longer than the setting ``max_question_chars`` (default 20,000 characters) is a
one-line error naming where it came from (``suwen ask``, a line of a questions file, a
sidecar); question files are read a line at a time, so a huge line is skipped without being
held in memory and the questions after it are still asked.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from suwen.batch import DEFAULT_MAX_QUESTION_CHARS, load_questions
from suwen.cli import app
from suwen.config import Settings
from tests.test_ask import Opened

LIMIT_NOTE = "the limit is 20000 (setting max_question_chars)"


def jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def errors(folder: Path, **kwargs: int) -> dict[str, str | None]:
    return {item.id: item.error for item in load_questions(folder, **kwargs).items}  # type: ignore[arg-type]


def test_default_limit_is_the_setting() -> None:
    assert Settings().max_question_chars == DEFAULT_MAX_QUESTION_CHARS == 20_000


def test_a_long_batch_question_is_an_error_item_naming_its_line(tmp_path: Path) -> None:
    jsonl(
        tmp_path / "questions.jsonl",
        [
            {"id": "ok", "question": "q" * 20_000},
            {"id": "long", "question": "q" * 20_001},
            {"id": "after", "question": "Is this still asked?"},
        ],
    )
    found = errors(tmp_path)
    assert found["ok"] is None and found["after"] is None
    assert found["long"] == (f"questions.jsonl:2: the question has 20001 characters; {LIMIT_NOTE}")
    small = errors(tmp_path, max_question_chars=25)
    assert small["after"] is None and "has 20000 characters; the limit is 25" in str(small["ok"])


def test_a_huge_line_is_skipped_without_being_held(tmp_path: Path) -> None:
    """A 40 MB line: the loader's peak memory stays far below it, and the lines after it are
    read."""
    path = tmp_path / "questions.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "first", "question": "Before?"}) + "\n")
        handle.write('{"id": "huge", "question": "' + "x" * 40_000_000 + '"}\n')
        handle.write(json.dumps({"id": "last", "question": "After?"}) + "\n")
    tracemalloc.start()
    try:
        found = errors(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000, peak
    assert found["first"] is None and found["last"] is None
    assert found["questions.jsonl:2"] == (
        "questions.jsonl:2: line longer than 145536 bytes, more than a question of 20000 "
        "characters can take (setting max_question_chars); not read"
    )


def test_csv_questions_are_bounded_too(tmp_path: Path) -> None:
    (tmp_path / "questions.csv").write_text(
        "id,question\nok,Short?\nlong," + "q" * 30 + "\n", encoding="utf-8"
    )
    found = errors(tmp_path, max_question_chars=20)
    assert found["ok"] is None
    assert found["long"] == (
        "questions.csv:3: the question has 30 characters; the limit is 20 "
        "(setting max_question_chars)"
    )
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "questions.csv").write_text(
        'id,question\nok,Short?\nhuge,"' + "q" * 200_000 + '"\n', encoding="utf-8"
    )
    found = errors(huge, max_question_chars=20)
    assert found["ok"] is None
    (message,) = [error for error in found.values() if error]
    assert "malformed CSV (a line longer than 65616 bytes); rows after it not read" in message


def test_an_oversized_sidecar_is_refused_unread(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "scan.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "other.png")
    (tmp_path / "scan.txt").write_text("q" * 70_000, encoding="utf-8")
    (tmp_path / "other.txt").write_text("What is shown?", encoding="utf-8")
    found = errors(tmp_path, max_question_chars=20)
    assert found["other"] is None
    assert found["scan"] == (
        "scan.txt: file longer than 65616 bytes, more than a question of 20 characters can "
        "take (setting max_question_chars); not read"
    )


def test_ask_refuses_a_long_question_in_one_line(
    suwen_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from suwen import runtime

    opened = Opened()
    previous = runtime.install_backends(opened.backends())
    try:
        result = CliRunner().invoke(app, ["ask", "q" * 20_001])
        assert result.exit_code == 2
        assert result.stderr.strip() == (
            f"error: suwen ask: the question has 20001 characters; {LIMIT_NOTE}"
        )
        assert not opened.model.calls and not opened.model_opened
        monkeypatch.setenv("SUWEN_MAX_QUESTION_CHARS", "30000")
        result = CliRunner().invoke(app, ["ask", "q" * 20_001])
        assert result.exit_code == 0, result.output
    finally:
        runtime.install_backends(previous)
