"""`suwen batch` end to end: in-process with the fake model, and killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from suwen import medimage, runtime
from suwen.cli import app
from suwen.errors import ModelError
from tests.conftest import REPO
from tests.fake_model import Fail
from tests.test_ask import Opened


@pytest.fixture()
def fake(suwen_home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "200")
    opened = Opened()
    previous = runtime.install_backends(opened.backends())
    yield opened
    runtime.install_backends(previous)


def _folder(root: Path, shared_data: Path, count: int, *, with_images: int = 3) -> Path:
    """``count`` questions: the first ``with_images`` about real VQA-RAD images."""
    folder = root / "study"
    folder.mkdir()
    images = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:with_images]
    rows = []
    for i in range(count):
        row: dict[str, object] = {
            "id": f"q{i:03d}",
            "question": f"[item {i:03d}] Is there a tension pneumothorax needing decompression?",
        }
        if i < len(images):
            shutil.copy(images[i], folder / images[i].name)
            row["image"] = images[i].name
        rows.append(json.dumps(row))
    (folder / "questions.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_batch_cli_answers_records_errors_and_summarises(
    fake: Opened, shared_data: Path, tmp_path: Path
) -> None:
    folder = _folder(tmp_path, shared_data, 6)
    with (folder / "questions.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"id": "bad", "image": "../../etc/passwd", "question": "Q?"}\n')
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in _rows(out)}
    assert len(rows) == 7
    assert "outside the folder" in rows["bad"]["error"]
    answered = [row for row in rows.values() if "error" not in row]
    assert len(answered) == 6 and all(row["mode"] == "agent" for row in answered)
    assert rows["q000"]["images"] == [sorted(p.name for p in folder.glob("*.jpg"))[0]]
    assert rows["q000"]["citations"]
    assert re.search(r"answered now\s*│\s*6", result.stdout)
    assert re.search(r"errors \(retried on the next run\)\s*│\s*1", result.stdout)
    assert "bad" in result.stdout and "outside the folder" in result.stdout

    # Everything answered: a second run starts no model and says so.
    fake.model_opened.clear()
    (folder / "questions.jsonl").write_text(
        "\n".join(
            line
            for line in (folder / "questions.jsonl").read_text("utf-8").splitlines()
            if '"bad"' not in line
        )
        + "\n",
        encoding="utf-8",
    )
    again = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert fake.model_opened == []
    assert re.search(r"answered before \(skipped\)\s*│\s*6", again.stdout)
    assert sorted(row["id"] for row in _rows(out)) == [f"q{i:03d}" for i in range(6)]


def test_batch_cli_plain_questions_file_and_bad_options(
    fake: Opened, shared_data: Path, tmp_path: Path
) -> None:
    folder = _folder(tmp_path, shared_data, 2)
    other = tmp_path / "mine.csv"
    other.write_text("id,image,question\nc1,,What is a pneumothorax?\n", encoding="utf-8")
    out = tmp_path / "plain.jsonl"
    args = ["batch", str(folder), "--out", str(out), "--questions", str(other), "--plain"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = _rows(out)
    assert row["id"] == "c1" and row["mode"] == "plain" and row["evidence"] == []

    bad = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out), "-c", "0"])
    assert bad.exit_code == 2 and "--concurrency 0" in bad.stderr
    missing = CliRunner().invoke(app, ["batch", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2 and "not a folder" in missing.stderr
    same = CliRunner().invoke(app, ["batch", str(folder), "--out", str(folder / "questions.jsonl")])
    assert same.exit_code == 2 and "is the questions file" in same.stderr


def test_batch_cli_decodes_each_image_once_and_an_unreadable_one_is_an_error_line(
    fake: Opened, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path, shared_data, 3)
    (folder / "broken.jpg").write_bytes(b"not a JPEG at all")
    with (folder / "questions.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"id": "bad", "image": "broken.jpg", "question": "[item 999] Normal?"}\n')
    decoded: Counter[str] = Counter()
    load_frames = medimage.load_frames

    def counting(path: Path, max_frames: int = 3) -> list[medimage.Frame]:
        decoded[Path(path).name] += 1
        return load_frames(path, max_frames)

    monkeypatch.setattr(medimage, "load_frames", counting)
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in _rows(out)}
    assert "broken.jpg" in rows["bad"]["error"]
    assert sorted(k for k, row in rows.items() if "error" not in row) == ["q000", "q001", "q002"]
    # Each question's image decoded once (by the agent, not a second time to check it), and
    # the unreadable one never reached the model.
    assert set(decoded.values()) == {1} and len(decoded) == 4
    assert not any("[item 999]" in call.text for call in fake.model.calls)


ITEM = re.compile(r"\[item (\d{3})\]")


def _start(folder: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tests.fake_cli", "batch", str(folder), "--out", str(out)]
    return subprocess.Popen(
        [*command, "--concurrency", "4"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _asked_items(call_log: Path) -> list[str]:
    if not call_log.exists():
        return []
    prompts = [json.loads(line)["prompt"] for line in call_log.read_text("utf-8").splitlines()]
    return ["q" + number for p in prompts for number in ITEM.findall(p)[:1]]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_answers_every_question_exactly_once(
    shared_data: Path, tmp_path: Path, suwen_home: Path
) -> None:
    total = 40
    folder = _folder(tmp_path, shared_data, total)
    out = tmp_path / "answers.jsonl"
    call_log = tmp_path / "calls.jsonl"
    env = dict(os.environ, SUWEN_FAKE_CALL_DELAY="0.03", SUWEN_FAKE_CALL_LOG=str(call_log))

    # Kill -9 at several moments: during start-up, and after 4, 13 and 25 answers were saved.
    for lines_before_kill in (None, 4, 13, 25):
        written_before = {row["id"] for row in _rows(out)} if out.exists() else set()
        asked_before = len(_asked_items(call_log))
        process = _start(folder, out, env)
        if lines_before_kill is None:
            time.sleep(0.3)
        else:
            deadline = time.monotonic() + 60
            while _line_count(out) < lines_before_kill and process.poll() is None:
                assert time.monotonic() < deadline, "the batch made no progress"
                time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
        # A run never asks again what an earlier run already saved.
        asked_now = set(_asked_items(call_log)[asked_before:])
        assert not asked_now & written_before

    # The kill may also cut a line short; simulate the worst case on top of whatever happened.
    with out.open("ab") as handle:
        handle.write(b'{"id": "q039", "mode": "agent", "answer": "The evid')

    final = _start(folder, out, env)
    assert final.wait(timeout=120) == 0, final.stderr.read() if final.stderr else ""
    ids = [row["id"] for row in _rows(out)]
    assert Counter(ids) == Counter(f"q{i:03d}" for i in range(total))  # each exactly once
    assert all("error" not in row and row["answer"] for row in _rows(out))
    assert not list(tmp_path.glob(".answers.jsonl*"))  # no temporary file left behind


def test_model_failures_become_error_lines_and_are_asked_again(
    fake: Opened, shared_data: Path, tmp_path: Path
) -> None:
    folder = _folder(tmp_path, shared_data, 5, with_images=1)
    out = tmp_path / "answers.jsonl"
    # The server fails outright on one question and breaks off mid-answer on another (a batch
    # asks for each answer in one reply, so what came before the break is not kept).
    fake.model.script("answer", Fail(ModelError("HTTP 503 from vLLM")), when="[item 002]")
    fake.model.script(
        "answer", Fail(ModelError("connection reset"), partial="The evid"), when="[item 003]"
    )
    result = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in _rows(out)}
    assert "no answer" in rows["q002"]["error"] and "HTTP 503" in rows["q002"]["error"]
    assert "no answer" in rows["q003"]["error"] and "connection reset" in rows["q003"]["error"]
    assert "The evid" not in json.dumps(rows["q003"])
    assert all("error" not in rows[f"q00{i}"] for i in (0, 1, 4))

    fake.model.rules.clear()  # the server is back
    again = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out), "--plain"])
    assert again.exit_code == 0, again.output
    asked = [call for call in fake.model.calls_for("answer")][-2:]
    assert sorted(ITEM.findall(call.text)[0] for call in asked) == ["002", "003"]
    rows = {row["id"]: row for row in _rows(out)}
    assert len(_rows(out)) == 5 and all("error" not in row for row in rows.values())
