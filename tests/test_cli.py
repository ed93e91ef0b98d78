"""The command line as a user meets it: help that reads as sentences, the exit codes listed in
`suwen --help`, and every error ending a command as one line with its kind's exit code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from suwen.cli import app
from suwen.errors import EXIT_CODE_MEANINGS, ExitCode
from suwen.indexes import store

SENTENCE_ENDS = (".", ":", ")", "?")


def commands(command: object, path: str = "suwen") -> Iterator[tuple[str, object]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, f"{path} {name}")


def help_texts(command: object) -> Iterator[str]:
    yield getattr(command, "help", None) or ""
    for param in getattr(command, "params", []):
        yield getattr(param, "help", None) or ""


def test_every_help_line_ends_a_sentence() -> None:
    """A source line break shows in the rendered help, so none may fall mid-sentence."""
    broken = [
        (path, line)
        for path, command in commands(typer.main.get_command(app))
        for text in help_texts(command)
        for line in text.strip().splitlines()
        if line.strip() and not line.rstrip().endswith(SENTENCE_ENDS)
    ]
    assert broken == []


def test_each_command_summary_is_one_line() -> None:
    """The first paragraph is what the command lists show: one sentence on one line."""
    long = [
        path
        for path, command in commands(typer.main.get_command(app))
        if "\n" in (getattr(command, "help", None) or "").strip().split("\n\n")[0]
    ]
    assert long == []


def test_help_lists_every_exit_code() -> None:
    shown = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0
    epilog = shown.stdout[shown.stdout.index("Exit codes:") :]
    for code, meaning in EXIT_CODE_MEANINGS.items():
        assert f"{int(code):>3}  {meaning}" in epilog


def run(home: Path, *args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["--home", str(home), *args], env={"COLUMNS": "300"})
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


def test_an_input_error_is_one_line_with_code_2(tmp_path: Path) -> None:
    code, lines = run(tmp_path / "home", "ask", "--plain", "--adaptive", "Is this asthma?")
    assert code == 2 and lines == ["error: --plain and --adaptive: choose one"]


def test_a_settings_error_is_an_input_error(tmp_path: Path) -> None:
    code, lines = run(tmp_path / "home", "--set", "no_such_setting=1", "config", "show")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "no_such_setting" in lines[0]


def test_a_missing_index_is_one_line_with_code_3(tmp_path: Path) -> None:
    code, lines = run(tmp_path / "home", "index", "info", "nowhere")
    assert code == 3 and len(lines) == 1
    assert lines[0].startswith("error: ") and "'nowhere'" in lines[0]


def test_a_model_that_is_not_here_is_one_line_with_code_4(tmp_path: Path) -> None:
    corpus = tmp_path / "abstracts.jsonl"
    corpus.write_text('{"pmid": "1", "title": "t", "abstract": "a"}\n')
    model = "someone/not-on-this-machine"
    args = ("--set", f"text_encoder={model}", "index", "text", "--name", "t", str(corpus))
    code, lines = run(tmp_path / "home", *args)
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 4 and errors == lines[-1:]  # after the progress bars, one line
    assert model in errors[0] and "not on this machine" in errors[0]


def test_a_job_left_undone_is_code_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["--home", str(tmp_path / "home"), "sessions", "purge"], input="n\n"
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: purge not confirmed: nothing was deleted"


def test_ctrl_c_is_one_line_with_code_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(indexes_dir: Path) -> list[store.IndexManifest]:
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "list_indexes", interrupted)
    code, lines = run(tmp_path / "home", "index", "list")
    assert code == ExitCode.INTERRUPTED == 130
    assert lines == ["error: interrupted"]


def test_ctrl_c_in_a_batch_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from suwen.commands import batch

    async def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch.BatchRun, "answer_all", interrupted)
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "questions.jsonl").write_text('{"id": "q1", "question": "Is this asthma?"}\n')
    out = tmp_path / "answers.jsonl"
    code, lines = run(tmp_path / "home", "batch", str(folder), "--out", str(out))
    assert code == 130 and len(lines) == 1
    assert lines[0].startswith("error: interrupted: every answer so far is saved in ")
    assert lines[0].endswith("run the same command again to finish")
