"""Suwen's log in the data home: owner-only, it records what whoever debugs a run needs (a
retried request, a degraded step, an error shown to the user, an index published) and never a
question, an answer or evidence text."""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen import logs
from suwen.cli import app
from suwen.errors import IndexMissingError
from tests.agent_helpers import ask, corpus, make_agent, question
from tests.fake_model import FakeModel
from tests.fake_search import FakeTextSearch
from tests.test_llm_client import FakeVLLM, completion, error, run
from tests.test_llm_client import ask as chat_messages

MARKER = "Patient Jane Roe MRN 4471 asks"


@pytest.fixture()
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = logs.configure(tmp_path / "home")
    assert path is not None
    yield path
    for handler in logging.getLogger("suwen").handlers:
        handler.flush()


def text_of(path: Path) -> str:
    for handler in logging.getLogger("suwen").handlers:
        handler.flush()
    return path.read_text(encoding="utf-8")


def owner_only(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_the_log_is_readable_by_its_owner_only_even_after_rotation(tmp_path: Path) -> None:
    path = logs.configure(tmp_path / "home")
    assert path is not None
    handler = next(h for h in logging.getLogger("suwen").handlers if hasattr(h, "doRollover"))
    logging.getLogger("suwen.test").warning("first")
    handler.doRollover()  # type: ignore[attr-defined]
    logging.getLogger("suwen.test").warning("second")
    handler.flush()
    rotated = path.with_name(path.name + ".1")
    assert "first" in rotated.read_text() and "second" in path.read_text()
    assert owner_only(path) and owner_only(rotated) and owner_only(path.parent)


def test_a_degraded_step_is_logged_without_the_question(log_file: Path, tmp_path: Path) -> None:
    text = FakeTextSearch(corpus(), fail=IndexMissingError("pubmed: index not found"))
    result = ask(make_agent(tmp_path, FakeModel(), text=text), question(f"{MARKER} about PE?"))
    assert result.answer
    logged = text_of(log_file)
    assert "degraded step retrieve" in logged and "pubmed: index not found" in logged
    assert "Jane Roe" not in logged and result.answer not in logged


def test_retries_and_a_final_failure_are_logged(log_file: Path, tmp_path: Path) -> None:
    from suwen.config import Settings

    settings = Settings(home=tmp_path, vlm="fake-vlm", max_retries=2, request_timeout=5.0)
    fake = FakeVLLM(error(503, "busy"), completion("fine"))
    assert run(fake.client(settings).chat(chat_messages(MARKER))).text == "fine"
    logged = text_of(log_file)
    assert "retrying a model request" in logged and "attempt 1 failed" in logged
    assert "Jane Roe" not in logged and "fine" not in logged


def test_an_error_shown_by_the_cli_is_in_the_home_log(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = CliRunner().invoke(app, ["--home", str(home), "index", "info", "no-such-index"])
    assert done.exit_code != 0
    logged = text_of(logs.log_path(home))
    assert "error:" in logged and "no-such-index" in logged
    assert owner_only(logs.log_path(home))
