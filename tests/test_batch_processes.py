"""`suwen batch --processes N`: several agent processes answer one question file.

Driven through the real CLI in its own process, against the stand-in model server of
``benchmarks/coordinator.py`` (it answers every request at once, so a run of hundreds of
questions takes seconds), with a data home without indexes (the agents answer without their
search tools; the indexes' own tests are elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # each test starts the CLI and its agent processes, 10-20 s

CLI = [sys.executable, "-c", "from suwen.cli import main; main()"]
# What differs between two runs of the same question: how long each step took.
PER_RUN = ("timings", "trace")


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    from benchmarks.coordinator import stand_in

    with stand_in() as url:
        yield url


def _folder(root: Path, shared_data: Path, count: int, images: int = 0) -> Path:
    """``count`` questions, the first ``images`` about real VQA-RAD images, then one about an
    image that is not an image."""
    folder = root / "study"
    folder.mkdir()
    found = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:images]
    rows: list[dict[str, Any]] = []
    for number in range(count):
        row: dict[str, Any] = {"id": f"q{number:04d}", "question": f"[{number}] Any effusion?"}
        if number < len(found):
            shutil.copy(found[number], folder / found[number].name)
            row["image"] = found[number].name
        rows.append(row)
    if images:
        (folder / "broken.jpg").write_bytes(b"not a JPEG at all")
        rows.append({"id": "broken", "question": "Any fracture?", "image": "broken.jpg"})
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (folder / "questions.jsonl").write_text(lines, encoding="utf-8")
    return folder


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "SUWEN_HOME": str(home)}


def _batch(folder: Path, out: Path, url: str, processes: int) -> list[str]:
    return [
        *CLI,
        "batch",
        str(folder),
        "--out",
        str(out),
        "--vllm-url",
        url,
        "--processes",
        str(processes),
        "--concurrency",
        "8",
    ]


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=_env(home), timeout=300)


def _records(out: Path) -> dict[str, dict[str, Any]]:
    lines = out.read_text(encoding="utf-8").splitlines()
    return {row["id"]: row for row in map(json.loads, lines)}


def _ids(out: Path) -> Counter[str]:
    if not out.exists():
        return Counter()
    return Counter(json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines())


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` now."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_lines(out: Path, count: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while sum(_ids(out).values()) < count:
        assert process.poll() is None, "the batch ended before it was interrupted"
        assert time.monotonic() < deadline, "no answers arrived"
        time.sleep(0.1)


def _agents_of(process: subprocess.Popen[bytes]) -> list[int]:
    """The batch's agent processes (its children running suwen.answer_processes)."""
    agents = [
        pid
        for pid in _children(process.pid)
        if b"suwen.answer_processes" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    return agents


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_two_agent_processes_write_what_one_process_writes(
    tmp_path: Path, shared_data: Path, model_url: str
) -> None:
    folder = _folder(tmp_path, shared_data, 30, images=4)
    home = tmp_path / "home"
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    first = _run(_batch(folder, one, model_url, 1), home)
    second = _run(_batch(folder, two, model_url, 2), home)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    by_one, by_two = _records(one), _records(two)
    assert by_one.keys() == by_two.keys() and len(by_two) == 31
    for key, row in by_one.items():
        other = by_two[key]
        assert {k: v for k, v in row.items() if k not in PER_RUN} == {
            k: v for k, v in other.items() if k not in PER_RUN
        }, key
    assert "broken.jpg" in by_two["broken"]["error"]  # refused by the agent that got it
    assert by_two["q0000"]["images"] and by_two["q0000"]["answer"]
    assert "answering without PubMed search" in second.stderr  # said once, not per process
    assert second.stderr.count("answering without PubMed search") == 1


def test_an_agent_process_that_cannot_open_refuses_as_one_process_does(
    tmp_path: Path, shared_data: Path, model_url: str
) -> None:
    folder = _folder(tmp_path, shared_data, 3)
    home = tmp_path / "home"
    (home / "indexes" / "pubmed").mkdir(parents=True)
    (home / "indexes" / "pubmed" / "CURRENT").write_text("garbage\n", encoding="utf-8")
    runs = [_run(_batch(folder, tmp_path / f"{n}.jsonl", model_url, n), home) for n in (1, 3)]
    assert [run.returncode for run in runs] == [3, 3]  # the exit code of a damaged index
    last_lines = [run.stderr.strip().splitlines()[-1] for run in runs]
    assert last_lines[0] == last_lines[1] and "CURRENT names 'garbage'" in last_lines[0]
    assert not any(_ids(tmp_path / f"{n}.jsonl") for n in (1, 3))


def test_interrupted_or_killed_batch_leaves_no_agent_running_and_resumes(
    tmp_path: Path, shared_data: Path, model_url: str
) -> None:
    folder = _folder(tmp_path, shared_data, 400)
    home, out = tmp_path / "home", tmp_path / "answers.jsonl"
    args = _batch(folder, out, model_url, 2)
    for stop, wanted in ((signal.SIGINT, 30), (signal.SIGKILL, 120)):
        process = subprocess.Popen(
            args,
            env=_env(home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        _wait_for_lines(out, wanted, process)
        agents = _agents_of(process)
        assert len(agents) == 2
        if stop == signal.SIGINT:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole group
        else:
            process.kill()  # only the parent: its agents must notice on their own
        code = process.wait(timeout=60)
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        if stop == signal.SIGINT:
            assert code == 130 and "every answer so far is saved" in stderr, stderr
        assert _gone_within(agents, 15), "an agent process outlived its batch"
        assert max(_ids(out).values()) == 1
    finished = _run(args, home)
    assert finished.returncode == 0, finished.stderr
    counts = _ids(out)
    assert len(counts) == 400 and set(counts.values()) == {1}


def test_an_agent_process_that_dies_costs_only_the_questions_it_held(
    tmp_path: Path, shared_data: Path, model_url: str
) -> None:
    folder = _folder(tmp_path, shared_data, 300)
    home, out = tmp_path / "home", tmp_path / "answers.jsonl"
    args = _batch(folder, out, model_url, 2)
    process = subprocess.Popen(args, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_lines(out, 30, process)
    victim = _agents_of(process)[0]
    os.kill(victim, signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()
    rows = _records(out)
    assert len(rows) == 300
    lost = [row for row in rows.values() if "error" in row]
    assert lost and all(f"answering process {victim} exited" in row["error"] for row in lost)
    assert len(lost) <= 8  # at most what was in flight: the other agent answered the rest
    again = _run(args, home)
    assert again.returncode == 0, again.stderr
    assert all("error" not in row for row in _records(out).values())


_BROKEN_CHILD = """
import json, sys
sys.stdin.readline()  # the spec
print(json.dumps({"ready": True, "notices": []}), flush=True)
for line in sys.stdin:
    reply = "not json" if sys.argv[1] == "garbage" else "x" * 5000
    print(reply, flush=True)
"""


@pytest.mark.parametrize("reply", ["garbage", "too-long"])
def test_a_reply_that_cannot_be_read_fails_its_question_instead_of_hanging(
    reply: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child whose reply is not Suwen's JSON, or longer than a line may be, is stopped and
    its question fails at once (a batch records it and goes on), never waits for ever."""
    from suwen import answer_processes
    from suwen.errors import ModelError
    from suwen.types import Question

    monkeypatch.setattr(answer_processes, "LINE_LIMIT", 1024)
    spec = answer_processes.ChildSpec(settings={}, urls=["http://127.0.0.1:9"])
    command = [sys.executable, "-c", _BROKEN_CHILD, reply]

    async def ask() -> str:
        async with answer_processes.started(spec, 1, command=command) as answer:
            with pytest.raises(ModelError) as failed:
                await asyncio.wait_for(answer(Question(text="Any effusion?")), 30)
            with pytest.raises(ModelError, match="every answering process has exited"):
                await answer(Question(text="And now?"))
            return str(failed.value)

    assert "answering process" in asyncio.run(ask())
