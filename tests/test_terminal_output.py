"""Terminal output cannot be hijacked (issue 17, item 4).

Titles, captions, ids, file names and answers holding rich markup (``[/]``, ``[link=...]``,
``[bold red]``) and terminal escape sequences are printed as the text they are: through the
CLI in-process, through the CLI as a process writing to a colour terminal, and through chat on
a pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pexpect
import pyte
import pytest
from PIL import Image
from rich.markdown import Markdown
from typer.testing import CliRunner

from suwen import runtime
from suwen.agent.sessions import CHAT_INPUT_HISTORY
from suwen.agent.state import Turn
from suwen.chat_session import ChatTurn
from suwen.cli import app
from suwen.commands import common
from suwen.commands.answer_view import transcript_markdown
from suwen.commands.chat import input_history
from suwen.commands.image_cmds import _print_cases
from suwen.commands.text_cmds import _print_hits
from suwen.config import Settings
from suwen.indexes import store
from suwen.sanitize import for_terminal
from suwen.types import AgentResult, ImageHit, TextHit
from tests.conftest import REPO
from tests.fake_search import FakeImageSearch, FakeTextSearch, case_hit, text_hit
from tests.test_ask import Opened
from tests.test_chat import ROWS, Terminal

RETRACTED = "Aspirin after ischaemic stroke [retracted in: Lancet 2019]"
MARKUP = "[link=https://evil.example]click[/link] [bold red]alarm[/] [/]"
# Escape sequences a document could carry: set the window title, an OSC 8 hyperlink, clear
# the screen, blink.
ESCAPES = "\x1b]0;PWNED\x07\x1b]8;;https://evil.example\x1b\\here\x1b]8;;\x1b\\\x1b[2J\x1b[5m"
ANSWER = (
    "Aspirin lowers early recurrence after ischaemic stroke [1][2][3]. "
    f"{MARKUP} [site](https://evil.example) {ESCAPES}end of answer."
)
QUESTION = "Does aspirin help after an ischaemic stroke?"
SGR = re.compile(r"\x1b\[[0-9;]*m")  # colours and bold: what rich itself writes


def hostile_passages() -> list[TextHit]:
    return [
        text_hit("101", f"{RETRACTED} {MARKUP}", f"Aspirin after ischaemic stroke. {ESCAPES}"),
        text_hit("[/]102", "Ischaemic stroke aspirin [bold red]trial", "Aspirin stroke trial."),
    ]


def hostile_cases() -> list[tuple[ImageHit, str]]:
    case = case_hit("case[/]7", f"Ischaemic stroke aspirin {MARKUP} {ESCAPES}")
    case = case.model_copy(update={"modality": "[bold red]CT\x1b[31m", "body_part": "[/]head"})
    return [(case, "d" * 64)]


DATA_SEQUENCES = ("\x1b]0;", "\x1b]8;", "\x1b[2J", "\x1b[5m", "]0;PWNED")


def printed_literally(output: str, *, rich_controls: bool = False) -> None:
    """What every hostile output must show: the markup as typed, and none of the data's escape
    sequences; without ``rich_controls`` (a spinner's cursor moves), no escape but SGR."""
    assert "[retracted in: Lancet 2019]" in output
    assert "[link=https://evil.example]click[/link]" in output
    assert "[bold red]alarm[/] [/]" in output
    assert not [seq for seq in DATA_SEQUENCES if seq in output], repr(output)
    if not rich_controls:
        assert "\x1b" not in SGR.sub("", output), repr(output)


@pytest.fixture()
def hostile(suwen_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Opened]:
    monkeypatch.setenv("COLUMNS", "400")
    opened = Opened()
    opened.model.script("answer", ANSWER)

    def open_text(settings: object, name: str) -> Iterator[FakeTextSearch]:
        yield FakeTextSearch(hostile_passages())

    def open_images(settings: object, name: str) -> Iterator[FakeImageSearch]:
        yield FakeImageSearch(hostile_cases())

    backends = runtime.Backends(
        opened.open_model, contextmanager(open_text), contextmanager(open_images)
    )
    previous = runtime.install_backends(backends)
    yield opened
    runtime.install_backends(previous)


def scan(tmp_path: Path, relative: str) -> Path:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (80, 80, 80)).save(path, format="PNG")
    return path


def test_ask_shows_markup_in_titles_captions_and_answer_as_text(
    hostile: Opened, tmp_path: Path
) -> None:
    image = scan(tmp_path, "scan[/]1.png")  # a folder 'scan[' holding ']1.png'
    result = CliRunner().invoke(app, ["ask", "--image", str(image), QUESTION])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Aspirin lowers early recurrence" in out and "end of answer." in out
    printed_literally(out)
    assert "PMID 101" in out
    assert "case[/]7" in out  # similar case id, in its table
    assert "site (https://evil.example)" in out  # a markdown link is text, not a hyperlink
    assert hostile.model.calls_for("look")[0].images == 1


def test_ask_names_a_missing_image_with_brackets_in_one_line(hostile: Opened) -> None:
    result = CliRunner().invoke(app, ["ask", "--image", "scan[/]2.png", QUESTION])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "scan[/]2.png" in lines[0]
    assert not hostile.model.calls


def test_terminal_sees_no_escape_and_no_link_from_data(tmp_path: Path, suwen_home: Path) -> None:
    """The CLI as its own process on a colour terminal (FORCE_COLOR): rich styles its own
    words, but nothing from the model or the documents reaches the terminal as a sequence."""
    corpus = tmp_path / "corpus.json"
    corpus.write_text(
        json.dumps(
            {
                "passages": [hit.model_dump(mode="json") for hit in hostile_passages()],
                "cases": [[hit.model_dump(mode="json"), sha] for hit, sha in hostile_cases()],
            }
        ),
        encoding="utf-8",
    )
    image = scan(tmp_path, "scan[/]1.png")
    env = dict(os.environ)
    env.update(
        SUWEN_HOME=str(suwen_home),
        SUWEN_FAKE_CORPUS=str(corpus),
        SUWEN_FAKE_ANSWER=ANSWER,
        FORCE_COLOR="1",
        COLUMNS="400",
        TERM="xterm-256color",
    )
    env.pop("NO_COLOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.fake_cli", "ask", "--image", str(image), QUESTION],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert SGR.search(done.stdout), "rich did not style its output: the test would prove nothing"
    printed_literally(done.stdout)
    printed_literally(done.stdout + done.stderr, rich_controls=True)
    assert "\x1b]8;" not in done.stdout + done.stderr  # no hyperlink at all
    assert "end of answer." in SGR.sub("", done.stdout)


def test_an_answer_that_cannot_be_rendered_is_printed_plainly(
    tmp_path: Path, suwen_home: Path
) -> None:
    """A terminal that cannot encode the answer's characters: rich fails, the answer is still
    printed (unencodable characters replaced), with a note on stderr."""
    env = dict(os.environ)
    env.update(
        SUWEN_HOME=str(suwen_home),
        SUWEN_FAKE_ANSWER="Aspirin ≥ 75 mg daily is the café standard [1].",
        PYTHONIOENCODING="ascii",
        COLUMNS="200",
    )
    done = subprocess.run(
        [sys.executable, "-m", "tests.fake_cli", "ask", "Aspirin dose after a tension stroke?"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="ascii",
        errors="replace",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Aspirin ? 75 mg daily is the caf? standard [1]." in done.stdout
    assert "could not render the output" in done.stderr
    assert "Sources:" in done.stdout and "not medical advice" in done.stdout


def test_print_or_plain_keeps_the_text_when_a_renderer_breaks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken() -> Markdown:
        raise RuntimeError("renderer bug")

    common.print_or_plain(broken, "the answer [1]\x1b[2J")
    captured = capsys.readouterr()
    assert captured.out == "the answer [1]\n"
    assert "could not render the output (RuntimeError)" in captured.err


def test_search_tables_print_ids_titles_captions_and_paths_literally(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    hits = [
        hit.model_copy(update={"page": 3}) for hit in hostile_passages()
    ]  # a PDF page number too
    with common.console.capture() as text_table:
        _print_hits(f"aspirin {MARKUP}", hits)
    printed_literally(text_table.get().replace("\n", " "))
    assert "[/]102" in text_table.get()
    cases = [hit.model_copy(update={"path": "/cases/scan[/]7.png"}) for hit, _ in hostile_cases()]
    with common.console.capture() as case_table:
        _print_cases(Path("scans/query[bold red]x.png"), "images", cases)
    out = case_table.get()
    for expected in (
        "query[bold red]x.png",
        "case[/]7",
        "/cases/scan[/]7.png",
        "[link=https://evil",
    ):
        assert expected in out
    assert "\x1b" not in out


def test_index_list_and_info_print_manifest_fields_literally(
    text_home_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real, intact index whose manifest fields carry markup and escapes (the manifest is not
    # among the digested files, so `index info` still opens the index).
    version = store.current_version(text_home_copy / "indexes" / "pubmed")
    assert version is not None
    built = store.read_manifest(version)
    manifest = built.model_copy(
        update={
            "encoder": f"enc[/]oder {MARKUP}",
            "sources": [f"/data/{RETRACTED}.xml", "/data/\x1b]0;PWNED\x07x.xml"],
            "extra": {**built.extra, "documents": "[bold red]3"},
        }
    )
    store.write_manifest(version, manifest)
    monkeypatch.setenv("SUWEN_HOME", str(text_home_copy))
    monkeypatch.setenv("COLUMNS", "400")
    listed = CliRunner().invoke(app, ["index", "list"])
    assert listed.exit_code == 0, listed.output
    assert "enc[/]oder [link=https://evil.example]click[/link]" in listed.stdout
    assert "[bold red]3" in listed.stdout
    info = CliRunner().invoke(app, ["index", "info", "pubmed"])
    assert info.exit_code == 0, info.output
    assert f"/data/{RETRACTED}.xml" in info.stdout and "\x1b" not in info.stdout


def test_error_lines_print_file_names_literally(capsys: pytest.CaptureFixture[str]) -> None:
    common.print_error(f"/data/{RETRACTED} [/] \x1b]0;PWNED\x07: not a PDF\nsecond line")
    common.print_errors([f"{MARKUP}: unreadable"])
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (f"error: /data/{RETRACTED} [/] : not a PDF second line")
    assert f"error: {MARKUP}: unreadable" in err


def test_terminal_cleaning_keeps_text_and_drops_sequences() -> None:
    assert for_terminal(f"a{ESCAPES}b") == "ahereb"
    assert for_terminal("x\x1b]0;PWNED\x07y") == "xy"
    assert for_terminal("x\x1b[31mred\x1b[0m\ty\nz\r\n") == "xred\ty\nz\n"
    assert for_terminal("left\u202eright\u2066") == "leftright"
    assert for_terminal("osc8 \x1b]8;;https://e\x1b\\t\x1b]8;;\x1b\\") == "osc8 t"
    assert for_terminal("c1 \x9b31mx") == "c1 x"


# -- chat on a pseudo-terminal ------------------------------------------------------------------

WIDE = 400


class RawTerminal(Terminal):
    """test_chat's terminal, wider (long titles stay on one line), keeping every raw byte."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.screen = pyte.HistoryScreen(WIDE, ROWS, history=10_000)
        self.stream = pyte.Stream(self.screen)
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "tests.fake_cli", *args],
            env=env,
            cwd=str(REPO),
            encoding="utf-8",
            dimensions=(ROWS, WIDE),
        )
        self.snapshots: list[str] = []
        self.raw = ""

    def pump(self, seconds: float = 0.05) -> None:
        try:
            data = self.child.read_nonblocking(1 << 16, timeout=seconds)
        except (pexpect.TIMEOUT, pexpect.EOF):
            time.sleep(seconds)
            data = ""
        self.raw += data
        self.stream.feed(data)
        self.snapshots.append(self.display())

    def text(self) -> str:
        history = [
            "".join(line[x].data for x in range(WIDE)).rstrip() for line in self.screen.history.top
        ]
        return "\n".join([*history, self.display()])


@pytest.mark.slow
def test_chat_prints_hostile_text_literally(
    tmp_path: Path, suwen_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus.json"
    corpus.write_text(
        json.dumps(
            {
                "passages": [hit.model_dump(mode="json") for hit in hostile_passages()],
                "cases": [[hit.model_dump(mode="json"), sha] for hit, sha in hostile_cases()],
            }
        ),
        encoding="utf-8",
    )
    image = scan(tmp_path, "scan[/]1.png")
    env = dict(os.environ)
    env.update(
        SUWEN_HOME=str(suwen_home),
        SUWEN_FAKE_CORPUS=str(corpus),
        SUWEN_FAKE_ANSWER=ANSWER,
        PROMPT_TOOLKIT_NO_CPR="1",
        TERM="xterm-256color",
        SUWEN_MAX_QUESTION_CHARS="200",
    )
    env.pop("NO_COLOR", None)
    term = RawTerminal(["chat"], env)
    term.wait_for("not medical advice")
    term.type(f"/image {image}")
    term.wait_for(f"attached {image}")
    term.type(QUESTION)
    term.wait_for("Evidence")
    term.wait_prompt()
    screen = term.text()
    assert "stroke [1][2][3]. [link=https://evil.example]click[/link] [bold red]alarm[/] [/]" in (
        screen
    )
    for expected in (RETRACTED, "case[/]7", "PMID [/]102", "[bold red]trial"):
        assert expected in screen
    term.type("/evidence 1")
    term.wait_for("[bold red]CT")  # the case's modality, in the detail panel
    assert "[/]head" in term.text()
    # A question over max_question_chars is refused in one line, and the chat goes on.
    term.type("why " * 60)
    term.wait_for("error: chat: the question has 239 characters; the limit is 200")
    term.type("/quit")
    assert term.exit_status() == 0
    assert not [seq for seq in DATA_SEQUENCES if seq in term.raw], repr(term.raw[-2000:])
    assert "\x1b]8;" not in term.raw  # no hyperlink at all
    # Typed lines are not kept on disk unless the setting asks for it.
    assert not (suwen_home / CHAT_INPUT_HISTORY).exists()


def test_chat_input_history_is_kept_only_when_asked_and_owner_only(tmp_path: Path) -> None:
    off = input_history(Settings(home=tmp_path / "off"))
    off.append_string("patient Jane Doe, MRN 123")
    assert not (tmp_path / "off" / CHAT_INPUT_HISTORY).exists()
    home = tmp_path / "on"
    home.mkdir(mode=0o755)
    (home / CHAT_INPUT_HISTORY).write_text("", encoding="utf-8")
    (home / CHAT_INPUT_HISTORY).chmod(0o644)  # left by an older version
    kept = input_history(Settings(home=home, chat_history=True))
    kept.append_string("patient Jane Doe, MRN 123")
    path = home / CHAT_INPUT_HISTORY
    assert "MRN 123" in path.read_text(encoding="utf-8")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_config_show_and_progress_details_print_literally(
    suwen_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setenv("SUWEN_TEXT_INDEX", f"pubmed {MARKUP}")
    shown = CliRunner().invoke(app, ["config", "show"])
    assert shown.exit_code == 0, shown.output
    assert f"pubmed {MARKUP}" in shown.stdout
    progress = common.progress_bars(common.detail_column())
    task = progress.add_task("files", total=None, detail=f"/data/{RETRACTED} [/]")
    rendered = common.detail_column().render(progress.tasks[task])
    assert rendered.plain == f"/data/{RETRACTED} [/]"


def test_a_saved_transcript_carries_no_escape_sequence() -> None:
    result = AgentResult(question=QUESTION, answer=ANSWER)
    turn = ChatTurn(f"{QUESTION} \x1b]0;PWNED\x07", [], result)
    earlier = [Turn(question="\x1b[2Jbefore", answer=f"old {ESCAPES}")]
    text = transcript_markdown("t1", earlier, [turn])
    assert "\x1b" not in text and "PWNED" not in text
    assert "[link=https://evil.example]click[/link]" in text and "**You:** before" in text
