"""`suwen ask`, run in-process with the scripted fake model and in-memory searchers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen import runtime
from suwen.cli import app
from suwen.config import Settings
from suwen.errors import IndexMissingError
from suwen.types import AgentResult
from tests.agent_helpers import NODES, QUESTION, cases, corpus
from tests.fake_model import FakeModel
from tests.fake_search import FakeImageSearch, FakeTextSearch


class Opened:
    """Fake backends that remember what was opened."""

    def __init__(self, *, indexes: bool = True) -> None:
        self.model = FakeModel()
        self.indexes = indexes
        self.model_opened: list[list[str]] = []

    @contextmanager
    def open_model(self, settings: Settings, urls: Sequence[str]) -> Iterator[FakeModel]:
        self.model_opened.append(list(urls))
        yield self.model

    @contextmanager
    def open_text(self, settings: Settings, name: str) -> Iterator[FakeTextSearch]:
        if not self.indexes:
            raise IndexMissingError(f"index {name!r} not found")
        yield FakeTextSearch(corpus())

    @contextmanager
    def open_images(self, settings: Settings, name: str) -> Iterator[FakeImageSearch]:
        if not self.indexes:
            raise IndexMissingError(f"index {name!r} not found")
        yield FakeImageSearch(cases())

    def backends(self) -> runtime.Backends:
        return runtime.Backends(self.open_model, self.open_text, self.open_images)


@pytest.fixture()
def fake(suwen_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Opened]:
    monkeypatch.setenv("COLUMNS", "200")
    opened = Opened()
    previous = runtime.install_backends(opened.backends())
    yield opened
    runtime.install_backends(previous)


@pytest.fixture()
def image(shared_data: Path) -> Path:
    return sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0]


def _ask(*args: str):
    return CliRunner().invoke(app, ["ask", *args])


def test_ask_renders_the_answer_citations_and_the_notice(fake: Opened, image: Path) -> None:
    result = _ask("--image", str(image), QUESTION)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "The evidence item number 1 supports this point [1]." in out
    assert "Citations" in out
    assert "PMID 111" in out and "Tension pneumothorax management" in out
    assert "case synpic1" in out and "Right tension pneumothorax with mediastinal shift." in out
    assert "not medical advice" in out
    # The image reached the model with the question.
    look = fake.model.calls_for("look")[0]
    assert look.images == 1


def test_ask_json_prints_the_full_typed_result(fake: Opened, image: Path) -> None:
    result = _ask("--image", str(image), QUESTION, "--json")
    assert result.exit_code == 0, result.output
    answer = AgentResult.model_validate_json(result.stdout)
    assert answer.mode == "agent" and answer.question == QUESTION
    evidence = {item.key for item in answer.evidence}
    assert answer.citations and {c.key for c in answer.citations} <= evidence
    assert [event.node for event in answer.trace] == NODES
    assert answer.model_calls == len(fake.model.calls) and answer.tokens.prompt > 0
    assert "not medical advice" not in result.stdout  # JSON is data, not a rendering


def test_ask_plain_is_the_model_alone(fake: Opened) -> None:
    result = _ask(QUESTION, "--plain", "--json")
    assert result.exit_code == 0, result.output
    answer = AgentResult.model_validate_json(result.stdout)
    assert answer.mode == "plain" and answer.evidence == [] and answer.citations == []
    assert [event.node for event in answer.trace] == ["answer", "verify", "assess"]
    assert {call.purpose for call in fake.model.calls} == {"answer", "confidence"}


def test_ask_without_indexes_answers_and_says_so(
    suwen_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = Opened(indexes=False)
    previous = runtime.install_backends(opened.backends())
    try:
        result = _ask(QUESTION, "--index", "mytexts")
    finally:
        runtime.install_backends(previous)
    assert result.exit_code == 0, result.output
    assert "index 'mytexts' not found -- answering without PubMed search" in result.stderr
    assert "answering without similar-case search" in result.stderr
    assert "general medical knowledge alone" in result.stdout


def test_vllm_urls_reach_the_model_opener(fake: Opened) -> None:
    urls = ["http://127.0.0.1:9001/v1", "http://127.0.0.1:9002/v1"]
    result = _ask(QUESTION, "--vllm-url", urls[0], "--vllm-url", urls[1], "--plain")
    assert result.exit_code == 0, result.output
    assert fake.model_opened == [urls]


def test_bad_input_fails_in_one_line_before_any_model_starts(fake: Opened, tmp_path: Path) -> None:
    broken = tmp_path / "scan.png"
    broken.write_bytes(b"\x89PNG but not really")
    result = _ask("--image", str(broken), QUESTION)
    assert result.exit_code == 2
    assert "scan.png" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = _ask("--image", str(tmp_path / "missing.jpg"), QUESTION)
    assert result.exit_code == 2 and "missing.jpg" in result.stderr
    result = _ask("   ")
    assert result.exit_code == 2 and "empty question" in result.stderr
    assert fake.model_opened == []
