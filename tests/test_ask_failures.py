"""`suwen ask` never passes off "no answer" as an answer: when the model cannot be reached,
every call fails, the answer is empty or breaks off, it exits non-zero with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen import runtime
from suwen.cli import app
from suwen.errors import ModelError
from tests.agent_helpers import QUESTION
from tests.fake_model import Fail
from tests.test_ask import Opened

SUWEN = Path(sys.executable).with_name("suwen")


@pytest.fixture()
def opened(suwen_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Opened]:
    monkeypatch.setenv("COLUMNS", "200")
    opened = Opened()
    previous = runtime.install_backends(opened.backends())
    yield opened
    runtime.install_backends(previous)


def _ask(*args: str):
    return CliRunner().invoke(app, ["ask", *args])


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_every_call_failing_exits_1_with_one_line(opened: Opened) -> None:
    down = Fail(ModelError("vLLM at http://127.0.0.1:8000: server died"))
    for purpose in ("look", "plan", "reread", "decide", "answer", "short_answer"):
        opened.model.script(purpose, down)
    result = _ask(QUESTION)
    assert result.exit_code == 1, result.output
    (line,) = _error_lines(result.stderr)
    assert "no answer" in line and "server died" in line
    assert "Citations" not in result.stdout


def test_an_empty_answer_exits_1(opened: Opened) -> None:
    opened.model.script("answer", "")
    result = _ask("--plain", QUESTION)
    assert result.exit_code == 1, result.output
    (line,) = _error_lines(result.stderr)
    assert "answer was empty" in line


def test_an_answer_that_breaks_off_is_shown_and_exits_1(opened: Opened) -> None:
    broken = Fail(ModelError("vLLM: connection reset"), partial="Needle decompression first [1].")
    opened.model.script("answer", broken)
    result = _ask(QUESTION)
    assert result.exit_code == 1, result.output
    assert "Needle decompression first" in result.stdout  # what came is not lost
    (line,) = _error_lines(result.stderr)
    assert "cut off" in line and "connection reset" in line


def test_json_output_still_carries_the_result_and_exits_1(opened: Opened) -> None:
    opened.model.script("answer", "")
    result = _ask("--plain", "--json", QUESTION)
    assert result.exit_code == 1
    assert '"answer": ""' in result.stdout


def test_an_answer_exits_0(opened: Opened) -> None:
    assert _ask(QUESTION).exit_code == 0


def test_unreachable_server_through_the_real_client_exits_1(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens once the socket is closed
    env = {**os.environ, "SUWEN_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    run = subprocess.run(
        [
            str(SUWEN),
            "--set",
            "max_retries=0",
            "ask",
            "--vllm-url",
            f"http://127.0.0.1:{port}",
            QUESTION,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr
    (line,) = _error_lines(run.stderr)
    assert f"cannot reach vLLM at http://127.0.0.1:{port}" in line
    assert run.stdout.strip() == ""
