"""`suwen chat` driven through a pseudo-terminal, the way a person uses it.

The CLI runs as its own process (``python -m tests.fake_cli``: the real CLI with the scripted
fake model and in-memory searchers). pexpect gives it a terminal; pyte renders what it writes,
so the assertions are about the screen a user would see, not about raw escape codes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import pyte
import pytest

from tests.conftest import REPO

QUESTION = "What is the first-line treatment for a tension pneumothorax?"
FULL_ANSWER_END = "supports this point [2]."
ROWS, COLUMNS = 50, 120

pytestmark = pytest.mark.slow


class Terminal:
    """A child process on a pseudo-terminal, with the screen it has drawn."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.screen = pyte.HistoryScreen(COLUMNS, ROWS, history=10_000)
        self.stream = pyte.Stream(self.screen)
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "tests.fake_cli", *args],
            env=env,
            cwd=str(REPO),
            encoding="utf-8",
            dimensions=(ROWS, COLUMNS),
        )
        self.snapshots: list[str] = []

    def pump(self, seconds: float = 0.05) -> None:
        try:
            self.stream.feed(self.child.read_nonblocking(1 << 16, timeout=seconds))
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            time.sleep(seconds)
        self.snapshots.append(self.display())

    def display(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def text(self) -> str:
        """Everything on the screen and scrolled above it."""
        history = [
            "".join(line[x].data for x in range(COLUMNS)).rstrip()
            for line in self.screen.history.top
        ]
        return "\n".join([*history, self.display()])

    def wait(self, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{self.text()}")
            self.pump()

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        self.wait(lambda: needle in self.text(), repr(needle), timeout)

    def at_prompt(self) -> bool:
        line = self.screen.display[self.screen.cursor.y]
        return line.lstrip().startswith("suwen") and ">" in line

    def wait_prompt(self) -> None:
        self.wait(self.at_prompt, "the prompt")

    def type(self, line: str) -> None:
        self.wait_prompt()
        self.snapshots.clear()
        self.child.send(line + "\r")

    def exit_status(self) -> int:
        self.wait(lambda: not self.child.isalive(), "the process to exit", timeout=30)
        self.child.close()
        assert self.child.exitstatus is not None
        return int(self.child.exitstatus)


@pytest.fixture()
def chat_env(suwen_home: Path, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SUWEN_HOME=str(suwen_home),
        SUWEN_FAKE_TOKEN_DELAY="0.06",
        SUWEN_FAKE_CALL_LOG=str(tmp_path / "calls.jsonl"),
        PROMPT_TOOLKIT_NO_CPR="1",
        TERM="xterm-256color",
    )
    env.pop("NO_COLOR", None)
    return env


@pytest.fixture()
def image(shared_data: Path) -> Path:
    return sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0]


def _answer_calls(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "calls.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_chat_answers_streams_shows_evidence_saves_and_survives_ctrl_c(
    chat_env: dict[str, str], image: Path, tmp_path: Path
) -> None:
    term = Terminal(["chat"], chat_env)
    term.wait_for("not medical advice")
    term.type(f"/image {image}")
    term.wait_for(f"attached {image}")
    term.wait(lambda: "suwen[1 image(s)]>" in term.display(), "the prompt to show the image")

    term.type(QUESTION)
    term.wait_for("Evidence")
    term.wait_prompt()
    # While it worked, the screen showed its steps and the answer growing word by word.
    assert any("✓ searching PubMed: " in shot for shot in term.snapshots)
    assert any("✓ rereading 5 passages -- kept 3 of 5" in shot for shot in term.snapshots)
    partial = [
        shot
        for shot in term.snapshots
        if "The evidence item number 1" in shot and FULL_ANSWER_END not in shot
    ]
    assert partial, "the answer never appeared before it was complete"
    screen = term.text()
    # The live view is replaced by the finished answer: it is on the screen once.
    assert screen.count(FULL_ANSWER_END) == 1
    for expected in ("PMID 111", "Tension pneumothorax management", "2020", "case synpic1"):
        assert expected in screen
    assert "Right tension pneumothorax with mediastinal shift." in screen  # a case's caption
    assert "not medical advice" in screen.split(FULL_ANSWER_END)[1]
    # The model was shown the attached image with the question.
    assert _answer_calls(tmp_path)[0]["images"] == 1

    term.type("/evidence 2")
    term.wait_for("Tension pneumothorax requires immediate needle decompression. A chest tube")
    term.type("/evidence 9")
    term.wait_for("/evidence N: N is one of 1, 2, 3")

    transcript = tmp_path / "chat.md"
    term.type(f"/save {transcript}")
    term.wait_for("saved the conversation to")
    saved = transcript.read_text(encoding="utf-8")
    assert QUESTION in saved and FULL_ANSWER_END in saved
    assert "2. PMID 111 -- Tension pneumothorax management (2020)" in saved
    assert "not medical advice" in saved
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # Ctrl-C while an answer streams cancels that answer, and the chat goes on.
    term.type("Is needle decompression for a tension pneumothorax done first?")
    term.wait(lambda: "writing the answer" in term.display(), "the answer to start")
    term.wait(lambda: "The evidence item" in term.display(), "the first words")
    term.child.sendintr()
    term.wait_for("answer cancelled")
    term.type("/plain")
    term.wait_for("plain mode on")
    term.type("And in a child with a tension pneumothorax?")
    term.wait_for("general medical knowledge alone")
    term.wait_for("plain mode: the model alone")
    term.wait_prompt()

    term.type("/quit")
    term.wait_for("suwen chat --resume")
    assert term.exit_status() == 0


def test_resume_continues_the_conversation(
    chat_env: dict[str, str], tmp_path: Path, image: Path
) -> None:
    first = Terminal(["chat", "--image", str(image)], chat_env)
    first.type(QUESTION)
    first.wait_for("Evidence")
    first.type("/quit")
    first.wait_for("suwen chat --resume")
    thread = first.text().split("suwen chat --resume ")[1].split()[0]
    assert first.exit_status() == 0

    again = Terminal(["chat", "--resume", thread], chat_env)
    again.wait_for(f"conversation {thread}")
    again.wait_for("resumed: 1 earlier turn(s)")
    again.wait(lambda: "suwen[1 image(s)]>" in again.display(), "the image to be kept")
    again.type("/sessions")
    again.wait_for("(this one)")
    assert QUESTION[:40] in again.text()
    again.type("What about the chest tube afterwards?")
    again.wait_for("Evidence")
    # The follow-up was asked with the earlier turn in its context.
    follow_up = _answer_calls(tmp_path)[-1]
    assert "What about the chest tube afterwards?" in follow_up["prompt"]
    assert QUESTION in follow_up["prompt"]
    assert follow_up["images"] == 1
    # Ctrl-D leaves.
    again.wait_prompt()
    again.child.sendeof()
    again.wait_for(f"suwen chat --resume {thread}")
    assert again.exit_status() == 0


def test_chat_prior_and_dates_from_the_command_line_label_the_studies(
    chat_env: dict[str, str], tmp_path: Path, image: Path
) -> None:
    prior = tmp_path / "old.jpg"
    prior.write_bytes(image.read_bytes())
    args = ["chat", "--image", str(image), "--date", "2021-02-03"]
    term = Terminal([*args, "--prior", str(prior), "--prior-date", "2019-01-01"], chat_env)
    term.type("What changed?")
    term.wait_for("not medical advice")
    term.type("/quit")
    assert term.exit_status() == 0
    assert _answer_calls(tmp_path)[-1]["labels"] == [
        "Image 1: prior study (2019-01-01): old.jpg",
        f"Image 2: current study (2021-02-03): {image.name}",
    ]
    term = Terminal([*args, "--prior-date", "2019-13-01"], chat_env)
    term.wait_for("error:")
    assert term.exit_status() == 2
    assert "--prior-date: date '2019-13-01' is not YYYY-MM-DD" in term.text()


def test_resume_of_an_unknown_thread_is_a_one_line_error(chat_env: dict[str, str]) -> None:
    term = Terminal(["chat", "--resume", "no-such-thread"], chat_env)
    term.wait_for("error:")
    assert term.exit_status() == 2
    assert "--resume no-such-thread: no saved conversation" in term.text()


def test_bad_image_is_refused_in_the_chat_and_on_the_command_line(
    chat_env: dict[str, str], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    term = Terminal(["chat", "--image", str(broken)], chat_env)
    term.wait_for("error:")
    assert term.exit_status() == 2

    term = Terminal(["chat"], chat_env)
    term.type(f"/image {broken}")
    term.wait_for("broken.png")
    term.wait_for("error:")
    term.type("/image")
    term.wait_for("no image attached")
    term.type("/nonsense")
    term.wait_for("unknown command /nonsense")
    term.type("/help")
    term.wait_for("/evidence")
    term.type("/quit")
    assert term.exit_status() == 0
